"""Tests for chat.py: real sockets, real processes, no mocks of the network.

Run with:  python3 -m unittest -v test_chat     (pytest finds them too)

Servers listen on port 0 on loopback.  Most tests run a chat.Server in a
daemon thread of this process so that they can also look at its buffers;
the command line, signals and the client run as subprocesses.  Every wait
has a deadline (TIMEOUT) and fails instead of hanging.
"""

import base64
import calendar
import collections
import errno
import glob
import http.server
import itertools
import json
import os
import queue
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import sys
import threading
import time
import unittest

import chat

TIMEOUT = 10.0        # the longest any single expectation may take
HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, 'chat.py')
PROMPT = '#lobby> '   # the terminal client's prompt: the room it is in
# Clients and servers keep files (known hosts, a certificate) under
# $XDG_CONFIG_HOME: a folder of the tests' own, not the user's.
os.environ['XDG_CONFIG_HOME'] = tempfile.mkdtemp(prefix='chat-test-config-')


# --- Helpers -----------------------------------------------------------------

def wait_until(predicate, what, timeout=TIMEOUT):
    """Poll predicate until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.005)


class ServerThread:
    """A chat.Server on 127.0.0.1, port 0, run in a daemon thread."""

    def __init__(self, **options):
        listener = socket.socket()
        listener.bind(('127.0.0.1', 0))  # bound here, before serving: no race
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.logs = []
        self.server = chat.Server([listener], log=self.logs.append, **options)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), 'server did not stop'

    def peer(self, name):
        """The server's Peer for name (read from the test thread)."""
        return self.server.names.get(chat.name_key(name))

    def wait_log(self, pattern):
        wait_for_log(self.logs, pattern)


def wait_for_log(logs, pattern):
    wait_until(lambda: any(re.search(pattern, line) for line in list(logs)),
               'log line %r in %r' % (pattern, logs))


def stepped_server(test, **options):
    """A chat.Server on loopback that the test steps itself with run_once(),
    so that what happens within one loop turn is exact; and its address.
    Its log lines go to test.logs."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(64)
    test.logs = []
    server = chat.Server([listener], log=test.logs.append, **options)
    test.addCleanup(server.close_all)
    return server, listener.getsockname()


def step_until(server, condition, what):
    """Step server's loop until condition() holds, within TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + what)
        server.run_once(timeout=0.1)


# Peers on hosts other than loopback: in a network namespace of the test's
# own (unshare -n), whose lo is given these addresses; nothing leaves it.
NETNS_HOSTS = ('10.200.0.1', '10.200.0.2')
NETNS_HOSTS6 = ('2001:db8:1::1', '2001:db8:1::2', '2001:db8:2::1')  # two in one /64
NETNS_RUN = (
    'import sys; sys.path.insert(0, sys.argv[1]); import test_chat, unittest; '
    'test_chat.configure_network_namespace(); '
    'unittest.main(module="test_chat", argv=["in its own network", sys.argv[2]])')


def set_loopback(up):
    """Bring the namespace's lo up (or down: nothing then gets through)."""
    import fcntl
    import struct
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack('16sH', fcntl.ioctl(sock, SIOCGIFFLAGS, b'lo'.ljust(32, b'\0'))[:18])[1]
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack('16sH14s', b'lo', flags, b''))


def configure_network_namespace():
    """Bring up lo in a new network namespace and give it NETNS_HOSTS and
    NETNS_HOSTS6, with ioctl() as ifconfig does (no ip command needed)."""
    import fcntl
    import struct
    SIOCSIFADDR = 0x8916
    set_loopback(True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i, host in enumerate(NETNS_HOSTS, 1):
            address = struct.pack('HH4s8s', socket.AF_INET, 0, socket.inet_aton(host), b'')
            fcntl.ioctl(sock, SIOCSIFADDR, struct.pack('16s16s', b'lo:%d' % i, address))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        for host in NETNS_HOSTS6:  # struct in6_ifreq: address, prefix length, index
            fcntl.ioctl(sock, SIOCSIFADDR, struct.pack(
                '16sIi', socket.inet_pton(socket.AF_INET6, host), 64, socket.if_nametoindex('lo')))


def in_own_network(test):
    """Call first in a test that needs peers on other hosts.  Outside a
    namespace it runs the test again in one of its own and returns False
    (the test then returns at once); inside, it returns True."""
    name = test.id().split('.', 1)[1]
    if os.environ.get('CHAT_TEST_NETNS') == name:
        return True
    if os.geteuid() != 0 or shutil.which('unshare') is None:
        test.skipTest('needs root and unshare(1) for a network namespace')
    result = subprocess.run(['unshare', '-n', sys.executable, '-c', NETNS_RUN, HERE, name],
                            env=dict(os.environ, CHAT_TEST_NETNS=name),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                            universal_newlines=True)
    if 'unshare failed' in result.stderr:
        test.skipTest('no network namespaces here: %s' % result.stderr.strip())
    if result.returncode != 0 or '\nOK' not in result.stderr:
        test.fail('in its own network namespace:\n' + result.stderr)
    return False


# The real programs some tests drive, and the Debian packages that have them
# (.ci/run installs them).  One that is missing fails its tests: a skip
# would read as a pass.
TOOLS = {'nc': 'netcat-openbsd', 'socat': 'socat', 'openssl': 'openssl', 'telnet': 'telnet',
         'ncat': 'ncat', 'bash': 'bash', 'chromium': 'chromium', 'redis-server': 'redis-server'}


def need(tool):
    """The path of tool; fail (do not skip) if it is not installed."""
    path = shutil.which(tool)
    if path is None:
        raise AssertionError('this test needs %s: apt-get install %s (or run .ci/run, which '
                             'installs it)' % (tool, TOOLS[tool]))
    return path


def roundtrip(conn, tokens=itertools.count()):
    """Every line conn sent before this is handled once it returns: a
    private message to itself, which nothing else can answer."""
    token = 'sync-%d' % next(tokens)
    conn.send('/msg %s %s\n' % (conn.name, token))
    return conn.expect(r'^\[PM from %s\] %s$' % (re.escape(conn.name), token))[0]


def came(name):
    """What others hear when name comes in and names itself at once: its
    joining under that name, or (if that was announced before the name
    came) its rename."""
    return r'^-!- (%s joined|\S+ is now known as %s)$' % (re.escape(name), re.escape(name))


def here_or_came(room, name):
    """What one who joins room hears of name, which may be there already (in
    the room's list) or come after (came())."""
    return r'^-!- \d+ online in %s: .*\b%s\b|%s' % (re.escape(room), re.escape(name),
                                                    came(name))


def recv_now(sock):
    """What a nonblocking socket has for us now (b'' if nothing)."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return b''
    if not data:
        raise ConnectionError('closed by the server')
    return data


class Conn:
    """A raw TCP peer, like nc: send bytes, read lines with deadlines.  With
    hello, it speaks first (an empty line) as chat.py client does, so the
    server lets it in at once instead of waiting HTTP_SNIFF_SEC to tell it
    from a browser; nc-like silence is tested on its own."""

    def __init__(self, port, rcvbuf=None, host='127.0.0.1', source=None, hello=True):
        self.sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
        if rcvbuf:  # set before connect so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:  # another host, in a network namespace of the test's own
            self.sock.bind((source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # like nc: no delay
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.seen = []
        if hello:
            self.send(b'\n')

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self, timeout=TIMEOUT):
        """The next line the server sent, without its newline; fail on timeout."""
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError('no line within %ss; seen: %r' % (timeout, self.seen[-10:]))
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError('closed by server; seen: %r' % self.seen[-10:])
            self.buf += data
        end = self.buf.index(b'\n')
        text = self.buf[:end].decode('utf-8')
        del self.buf[:end + 1]
        self.seen.append(text)
        return text

    def expect(self, pattern, timeout=TIMEOUT):
        """Read lines until one matches the regular expression; return the
        lines read before it and the match."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            text = self.line(max(0.0, deadline - time.monotonic()))
            match = re.search(pattern, text)
            if match:
                return before, match
            before.append(text)

    def expect_closed(self, timeout=TIMEOUT):
        """Read until the server closes; return the lines read."""
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines.append(self.line(max(0.0, deadline - time.monotonic())))
            except ConnectionError:
                return lines

    def close(self):
        self.sock.close()


def flood(sender, name, reader, lines):
    """sender sends lines at once (from a thread: it may block); what reader
    got of them, in order, other lines aside."""
    thread = threading.Thread(target=sender.send, args=(''.join(l + '\n' for l in lines),))
    thread.start()
    got, prefix = [], '<%s> ' % name
    while len(got) < len(lines):
        line = reader.line()
        if line.startswith(prefix):
            got.append(line[len(prefix):])
    thread.join(TIMEOUT)
    return got


class ServerTestCase(unittest.TestCase):
    """Starts a fresh server per test; options in SERVER_OPTIONS.  With
    IN_PROCESS false it is a subprocess, for tests whose readers must keep
    up with it (in this process they would share the server's GIL)."""

    SERVER_OPTIONS = {}
    SELECTOR = None  # None: the default selector
    IN_PROCESS = True

    def setUp(self):
        options = dict(self.SERVER_OPTIONS)
        if not self.IN_PROCESS:
            self.srv = ServerProcess(*['--%s=%s' % (key.replace('_', '-'), value)
                                       for key, value in options.items()])
        else:
            if self.SELECTOR is not None:
                options['selector_class'] = self.SELECTOR
            self.srv = ServerThread(**options)
        self.addCleanup(self.srv.stop)
        self.conns = []

    def connect(self, name=None, **kw):
        """A connected peer, past its welcome; renamed to name if given."""
        conn = Conn(self.srv.port, **kw)
        self.addCleanup(conn.close)
        _, match = conn.expect(r'^-!- Welcome, (\S+)!')
        conn.name = match.group(1)
        conn.expect(r'^-!- \d+ online in #')
        if name:
            conn.send('/nick %s\n' % name)
            conn.expect(r'^-!- %s is now known as %s$' % (re.escape(conn.name), re.escape(name)))
            conn.name = name
        # Everyone already here hears of it (by its new name, if its joining was
        # not yet announced): wait, so that no test sees a stale notice.
        for other in self.conns:
            other.expect(r'^-!- (%s joined|%s is now known as %s)$' % (
                re.escape(conn.name), re.escape(match.group(1)), re.escape(conn.name)))
        self.conns.append(conn)
        return conn

    def sync(self, conn):
        """Round trip: every line conn sent before this is handled once it returns."""
        conn.send('/who\n')
        return conn.expect(r'^-!- \d+ online in #')[0]


def run_chat(*args, stdin_data=None, timeout=TIMEOUT, **kw):
    """Run chat.py as a subprocess; its CompletedProcess (text)."""
    return subprocess.run([sys.executable, CHAT] + list(args), input=stdin_data,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, universal_newlines=True, **kw)


class ServerProcess:
    """chat.py server as a subprocess on a free port (read from its banner);
    its log lines are collected in self.logs as they come."""

    def __init__(self, *args, host='127.0.0.1', port=0, python=(sys.executable,), **popen_kw):
        command = list(python) + [CHAT, 'server', str(port)] + list(args)
        if host:
            command += ['--host', host]
        popen_kw.setdefault('stdin', subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, **popen_kw)
        self.banner = self.proc.stdout.readline()
        match = re.search(r'listening on \S+:(\d+)', self.banner)
        if not match:
            self.proc.kill()
            raise AssertionError('no banner: %r %r' % (self.banner, self.proc.stderr.read()))
        self.port = int(match.group(1))
        self.logs = []
        self.log_reader = threading.Thread(target=self.read_logs, daemon=True)
        self.log_reader.start()

    def read_logs(self):
        for line in self.proc.stderr:
            self.logs.append(line.rstrip('\n'))

    def wait_log(self, pattern):
        wait_for_log(self.logs, pattern)

    def finish(self, sig=signal.SIGTERM):
        """Send sig; the exit status, standard output and the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(TIMEOUT)
        out = self.proc.stdout.read()  # stderr belongs to the log reader
        self.log_reader.join(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, self.banner + out, '\n'.join(self.logs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.log_reader.join(TIMEOUT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


# --- Text protocol -----------------------------------------------------------

class TestText(unittest.TestCase):

    def test_a_long_motd_is_cut_at_a_line_not_in_a_character(self):
        folder = tempfile.mkdtemp(prefix='chat-motd-')
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, 'motd')
        with open(path, 'w', encoding='utf-8') as motd:
            motd.write(('\u00e9' * 49 + 'x\n') * 400)  # 40 KB, two-byte characters
        lines = chat.read_motd(path)
        self.assertEqual(set(lines), {'\u00e9' * 49 + 'x'})
        self.assertLessEqual(len('\n'.join(lines).encode()), chat.MAX_MOTD_BYTES)

    def test_up_never_recalls_a_line_that_carries_a_password(self):
        editor = chat.LineEditor()
        for line in ('hello', '/PASS open sesame', '/register correct horse',
                     '/nick ann correct horse', '/op secret', '/nick bob'):
            for key in line:
                editor.press(key)
            self.assertEqual(editor.press('enter'), line)
        self.assertEqual(editor.history, ['hello', '/nick bob'])
        self.assertIn('const SECRET_LINE = /%s/i;' % chat.SECRET_LINE.pattern, chat.PAGE)

    def test_the_client_follows_renames_by_operators_and_long_name_lists(self):
        people = chat.People()
        for text in ('-!- You are in #dev', '-!- 23 online in #dev: ann, bob and 21 others '
                     '(/who lists them)', '-!- bob is now known as rob (renamed by op)'):
            people.hear(text)
        self.assertEqual(people.names, {'ann', 'rob'})

    def test_clean_removes_controls_escapes_and_bidi_overrides(self):
        evil = 'a\x1b[2Jb\x07c\rd\x00e\x7ff\x9b31mg\u202eh\u2066i\u2069j'
        self.assertEqual(chat.clean(evil), 'a[2Jbcdef31mghij')
        self.assertEqual(chat.clean('tab\there'), 'tab here')
        self.assertEqual(chat.clean('line\nbreak'), 'linebreak')

    def test_clean_keeps_every_script(self):
        text = '안녕하세요 こんにちは Привет ça va 😀'
        self.assertEqual(chat.clean(text), text)

    def test_decode_replaces_invalid_utf8(self):
        self.assertEqual(chat.decode(b'ok \xff\xfe end'), 'ok \ufffd\ufffd end')
        self.assertEqual(chat.decode('한'.encode()[:2]), '\ufffd')

    def test_every_kind_of_line_has_its_own_marker(self):
        lines = [chat.public_line('a', 'x'), chat.action_line('a', 'x'),
                 chat.private_line('a', 'x'), chat.sent_line('a', 'x'),
                 chat.notice_line('x'), chat.error_line('x')]
        markers = ['<', '* ', '[PM from ', '[PM to ', '-!- ', '!!! ']
        for line, marker in zip(lines, markers):
            self.assertTrue(line.decode().startswith(marker), line)
            self.assertTrue(line.endswith(b'\n'))

    def test_valid_names(self):
        for name in ('alice', 'Bob_2', 'a.b-c', '김철수', 'José', 'Вася', 'Σωκράτης',
                     'नमस्ते', '山田', 'x' * chat.MAX_NAME_CHARS):
            self.assertIsNone(chat.name_problem(name), name)

    def test_invalid_names_say_why(self):
        cases = {'': 'at least one', 'x' * 25: 'at most 24', 'a b': 'letters, digits',
                 'a<b': 'letters, digits', '\u0301a': 'letters, digits',
                 'p\u0430ypal': 'mix scripts', '\u03b1lpha': 'mix scripts',
                 '203.0.113.9': 'look like an address'}
        for name, reason in cases.items():
            self.assertIn(reason, chat.name_problem(name) or '', repr(name))

    def test_look_alike_names_are_refused(self):
        invisible = ['alice\u034f', 'serve\u034fr', 'gues\u034ft-1', 'alice\ufe0f',
                     'alice\U000e0100', 'bob\u180b', 'k\u17b4im', 'ann\u200d']
        for name in invisible:
            self.assertIn('invisible', chat.name_problem(name) or '', repr(name))
        mixed = ['\ua4eelice', '\u13aalice', 'g\u0585\u0585gle', 'bob\u1433', 'a\u0661']
        for name in mixed:  # Lisu, Cherokee, Armenian, Canadian syllabics, Arabic digits
            self.assertIn('may not mix scripts', chat.name_problem(name) or '', repr(name))
        for name in ('a\u01c0ice', '\u1d00lice'):  # a click that looks like "l", small caps
            self.assertIn('rare Latin letter', chat.name_problem(name) or '', repr(name))

    def test_names_in_one_script_or_a_usual_mix_are_fine(self):
        for name in ('\u5c71\u7530\u30bf\u30ed\u30a6', 'kim\uc9c0\uc218', 'Nguy\u1ec5n',
                     '\u0141ukasz', '\u0639\u0644\u064a\u0661', '\u10e5\u10d0\u10e0', 'abc123'):
            self.assertIsNone(chat.name_problem(name), repr(name))

    def test_format_characters_that_hide_or_reorder_text_are_removed(self):
        hidden = ('a\u200eb\u200fc\u061cd\ufeffe\u200bf\U000e0041g\u2060h\u00adi'
                  '\u202aj\u2067k')
        self.assertEqual(chat.clean(hidden), 'abcdefghijk')
        self.assertEqual(chat.clean('\U0001f469\u200d\U0001f4bb'),  # a joiner in emoji stays
                         '\U0001f469\u200d\U0001f4bb')
        import io
        log = io.StringIO()
        chat.make_log(stream=log)('x\u200ey\U000e0041')
        self.assertTrue(log.getvalue().endswith(' x\\u200ey\\U000e0041\n'), log.getvalue())

    def test_combining_marks_are_capped_per_letter(self):
        zalgo = 'z' + '\u0301' * 2000 + 'ok'
        self.assertEqual(chat.clean(zalgo), 'z' + '\u0301' * chat.MAX_MARKS + 'ok')
        self.assertEqual(chat.clean('Vi\u1ec7t \u0928\u092e\u0938\u094d\u0924\u0947'),
                         'Vi\u1ec7t \u0928\u092e\u0938\u094d\u0924\u0947')

    def test_invisible_only_lines_are_blank(self):
        for text in ('', '   ', '\u3164\u2800', '\u115f\u1160 \u200d', '\ufe0f\u034f'):
            self.assertTrue(chat.has_blank_line(chat.clean(text)), repr(text))
        self.assertTrue(chat.has_blank_line(chat.clean('\u3164\u2800\u200b')))
        self.assertFalse(chat.has_blank_line('\u3164x'))
        for lines in ('a\n\nb', 'a\n \u3164', '\t\nb', 'a\nb\n'):  # one line of several
            self.assertTrue(chat.has_blank_line(lines), repr(lines))
        self.assertFalse(chat.has_blank_line('a\n \u3164b\n\u2800c'))

    def test_long_runs_of_spaces_are_shortened(self):
        for blank in (' ', '\t', '\xa0', '\u2002', '\u3000', '\u2800', '\u3164', '\u205f'):
            padded = 'ok' + blank * 68 + '<bob> I am leaving'  # the next row of 80 columns
            self.assertEqual(chat.tidy(padded), 'ok' + ' ' * chat.MAX_SPACE_RUN +
                             '<bob> I am leaving', repr(blank))
        code = 'if x:' + ' ' * 8 + 'return'
        self.assertEqual(chat.tidy(code), code)  # eight survive

    def test_widths_agree_with_the_terminals_wcwidth(self):
        import ctypes
        import ctypes.util
        import locale
        import unicodedata
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        saved = locale.setlocale(locale.LC_CTYPE)
        locale.setlocale(locale.LC_CTYPE, 'C.UTF-8')
        self.addCleanup(locale.setlocale, locale.LC_CTYPE, saved)
        libc.wcwidth.argtypes = [ctypes.c_wchar]
        ranges = [(0x20, 0x7f), (0xa0, 0x100), (0x300, 0x370), (0x600, 0x606),
                  (0x1100, 0x1200), (0x200b, 0x2010), (0x3000, 0x3040), (0xa960, 0xa97d),
                  (0xac00, 0xac40), (0xd7b0, 0xd7c7), (0xff01, 0xff61), (0x1f600, 0x1f650)]
        for start, end in ranges:
            for code in range(start, end):
                ch = chr(code)
                width = libc.wcwidth(ch)
                if width >= 0 and unicodedata.category(ch) != 'Cn':  # known to both
                    self.assertEqual(chat.char_width(ch), width, 'U+%04X' % code)

    def test_fixed_notices_fit_72_columns(self):
        # With the client's "HH:MM " in front, still within 80 columns.
        for line in (chat.notice_line(chat.WELCOME_TEXT % 'guest-99999'),
                     chat.notice_line(chat.PASSWORD_PROMPT), chat.error_line(chat.NOT_TLS),
                     chat.notice_line(chat.FLOOD_TEXT % 0.25),
                     chat.error_line('too many connections from 2001:db8:ffff:ffff::/64 (32); '
                                     'try later'),
                     chat.error_line('you are banned until the server restarts')):
            self.assertLessEqual(len(line.decode().rstrip('\n')), 72, line)
        self.assertIn('within 30 s', chat.PASSWORD_PROMPT)  # the deadline, said at once

    def test_the_http_verdict_needs_a_method_and_a_path(self):
        for first, verdict in ((b'GET / HTTP/1.1', True), (b'POST /' + b'a' * 5000, True),
                               (b'OPTIONS *', True), (b'CONNECT example.org:443', True),
                               (b'G', None), (b'GET ', None), (b'GET htt', None),
                               (b'GET lunch?', False), (b'hello', False), (b'\n', False),
                               (b'get /', False)):
            self.assertEqual(chat.http_verdict(first), verdict, first)

    def test_name_key_folds_case_and_compatibility_forms(self):
        self.assertEqual(chat.name_key('Alice'), chat.name_key('ALICE'))
        self.assertEqual(chat.name_key('Alice'), chat.name_key('\uff21\uff4c\uff49\uff43\uff45'))
        self.assertEqual(chat.name_key('ﬁsh'), chat.name_key('FISH'))
        self.assertNotEqual(chat.name_key('alice'), chat.name_key('alic'))

    def test_next_line_frames_across_reads(self):
        peer = chat.Peer(None, 'test', burst=1)
        for piece in (b'hel', b'lo\r\nwor', b'ld\npart'):
            peer.inbuf += piece
        self.assertEqual(peer.next_line(100), b'hello\r')
        self.assertEqual(peer.next_line(100), b'world')
        self.assertIsNone(peer.next_line(100))
        self.assertEqual(bytes(peer.inbuf), b'part')

    def test_next_line_refuses_overlong_lines(self):
        peer = chat.Peer(None, 'test', burst=1)
        peer.inbuf += b'x' * 11 + b'\n' + b'y' * 10 + b'\r\n'
        self.assertIs(peer.next_line(10), chat.TOO_LONG)
        self.assertEqual(peer.next_line(10), b'y' * 10 + b'\r')

    def test_unfinished_line_is_bounded_and_its_tail_skipped(self):
        peer = chat.Peer(None, 'test', burst=1)
        peer.inbuf += b'z' * 20
        self.assertTrue(peer.trim_unfinished_line(10))
        self.assertEqual(len(peer.inbuf), 0)
        peer.inbuf += b'z' * 20
        self.assertFalse(peer.trim_unfinished_line(10))  # refused once only
        peer.inbuf += b'zz\nnext\n'
        self.assertEqual(peer.next_line(10), b'')      # the tail is dropped
        self.assertEqual(peer.next_line(10), b'next')


# --- Server: the protocol ----------------------------------------------------

class ProtocolTests:
    """Mixed into one TestCase per selector class (Windows has only select)."""

    SERVER_OPTIONS = {'rate': 0}

    def test_welcome_names_the_peer_and_lists_who_is_online(self):
        alice = self.connect('alice')
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        self.assertEqual(conn.line(), '-!- ' + chat.WELCOME_TEXT % 'guest-2')
        self.assertEqual(conn.line(), '-!- You are in #lobby')
        self.assertEqual(conn.line(), '-!- 2 online in #lobby: alice, guest-2')
        alice.expect(r'^-!- guest-2 joined$')

    def test_a_newcomer_that_names_itself_at_once_is_announced_by_that_name(self):
        alice = self.connect('alice')
        bob = Conn(self.srv.port)
        self.addCleanup(bob.close)
        bob.send('/nick bob\n')  # as chat.py client --name does, first thing
        bob.expect(r'^-!- guest-2 is now known as bob$')  # it learns its name
        before, _ = alice.expect(r'^-!- bob joined$')
        self.assertEqual(before, [])  # not "guest-2 joined", then a rename
        self.assertEqual(self.sync(alice), [])

    def test_guest_numbers_are_never_reused(self):
        first = self.connect()
        first.send('/quit\n')
        self.assertEqual(first.expect_closed()[-1:], ['-!- Goodbye'])
        self.conns.remove(first)
        self.assertEqual(self.connect().name, 'guest-2')

    def test_public_message_reaches_others_not_sender(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        alice.send('hello, world\n')
        bob.expect(r'^<alice> hello, world$')
        carol.expect(r'^<alice> hello, world$')
        self.assertNotIn('<alice> hello, world', self.sync(alice))

    def test_double_slash_sends_a_literal_slash(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('//usr/bin is a path\n')
        bob.expect(r'^<alice> /usr/bin is a path$')

    def test_crlf_and_empty_lines(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('\r\n\n  \nfrom telnet\r\n\x07\n')
        before, _ = bob.expect(r'^<alice> from telnet$')
        self.assertEqual(before, [])
        alice.send('after\n')
        self.assertEqual(bob.line(), '<alice> after')  # nothing for the blank lines

    def test_each_line_gets_its_own_prefix_however_it_is_split(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        seen = []
        for piece in (b'hel', b'lo\nsec', b'ond\nthi', b'rd', b'\n'):
            alice.send(piece)
            seen += self.sync(bob)  # most likely in a read of its own by now
        while len(seen) < 3:
            seen.append(bob.line())
        self.assertEqual(seen, ['<alice> hello', '<alice> second', '<alice> third'])

    def test_invalid_utf8_is_replaced_not_fatal(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send(b'caf\xc3 \xfe\x80 ok\n')  # (0xff is telnet's, and taken out)
        bob.expect('^<alice> caf\ufffd \ufffd\ufffd ok$')
        alice.send('still here\n')
        bob.expect(r'^<alice> still here$')

    def test_padding_and_invisible_lines_cannot_forge_lines(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('ok%s<bob> I am leaving\n\u3164\u2800\u200b\n/quit%s-!- bob is an '
                   'operator\n' % (' ' * 68, ' ' * 40))
        self.assertEqual(bob.line(), '<alice> ok%s<bob> I am leaving' % (' ' * chat.MAX_SPACE_RUN))
        self.assertEqual(bob.line(), '-!- alice left (quit: -!- bob is an operator)')

    def test_control_characters_cannot_forge_or_escape(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('hi\r<bob> fake\x1b[2J\x1b]0;title\x07\u202egnp.exe\x9b1m\n')
        line = bob.line()
        self.assertEqual(line, '<alice> hi<bob> fake[2J]0;titlegnp.exe1m')
        self.assertIsNone(re.search('[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]', line))

    def test_nick_is_announced_to_everyone_including_the_renamed(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('/nick alicia\n')
        alice.expect(r'^-!- alice is now known as alicia$')
        bob.expect(r'^-!- alice is now known as alicia$')
        alice.send('hi\n')
        bob.expect(r'^<alicia> hi$')
        self.srv.wait_log(r'alice is now known as alicia')

    def test_korean_names_and_text(self):
        alice, bob = self.connect('김철수'), self.connect('bob')
        alice.send('안녕하세요 😀\n')
        bob.expect('^<김철수> 안녕하세요 😀$')
        bob.send('/msg 김철수 반가워요\n')
        alice.expect(r'^\[PM from bob\] 반가워요$')

    def test_taken_names_collide_after_case_folding_and_nfkc(self):
        self.connect('Alice')
        bob = self.connect('bob')
        for attempt in ('alice', 'ALICE', '\uff21\uff4c\uff49\uff43\uff45'):
            bob.send('/nick %s\n' % attempt)
            bob.expect(r'^!!! cannot use the name .*: the name is taken by Alice$')

    def test_refused_names_say_why(self):
        bob = self.connect('bob')
        cases = [('p\u0430ypal', 'may not mix scripts (Cyrillic and Latin)'),
                 ('x' * 25, 'at most 24 characters'),
                 ('a<b>', 'only letters, digits'),
                 ('guest-99', 'the server keeps "server" and names starting with "guest-"'),
                 ('Server', 'the server keeps "server"'),
                 ('alice\u034f', 'may not hold invisible characters'),
                 ('bob', 'that is the name already')]
        for name, reason in cases:
            bob.send('/nick %s\n' % name)
            bob.expect(r'^!!! cannot use the name .*: .*%s' % re.escape(reason))
        bob.send('/nick\n')
        bob.expect(r'^!!! usage: /nick NAME \[PASSWORD\]$')

    def test_a_case_change_of_your_own_name_is_allowed(self):
        bob = self.connect('bob')
        bob.send('/nick Bob\n')
        bob.expect(r'^-!- bob is now known as Bob$')

    def test_who(self):
        self.connect('alice')
        bob = self.connect('bob')
        self.assertEqual(self.sync(bob), [])
        bob.send('/WHO\n')
        bob.expect(r'^-!- 2 online in #lobby: alice, bob$')

    def test_me(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('/me waves\n')
        bob.expect(r'^\* alice waves$')
        alice.send('/me\n')
        alice.expect(r'^!!! usage: /me ACTION$')

    def test_msg_reaches_only_its_recipient_and_is_confirmed(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        alice.send('/msg BOB psst, a secret\n')
        alice.expect(r'^\[PM to bob\] psst, a secret$')
        bob.expect(r'^\[PM from alice\] psst, a secret$')
        alice.send('public now\n')
        before, _ = carol.expect(r'^<alice> public now$')
        self.assertEqual(before, [])
        alice.send('/msg nobody hi\n')
        alice.expect(r'^!!! no one called nobody is online$')
        alice.send('/msg bob\n')
        alice.expect(r'^!!! usage: /msg NAME TEXT$')

    def test_quit_with_reason_is_announced_and_closes(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('/quit see you later\nnot sent\n')
        self.assertEqual(alice.expect_closed(), ['-!- Goodbye'])
        before, _ = bob.expect(r'^-!- alice left \(quit: see you later\)$')
        self.assertEqual(before, [])
        self.srv.wait_log(r'alice left \(quit: see you later\)')

    def test_help_and_unknown_commands_go_to_the_sender_only(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('/help\n')
        lines, _ = alice.expect(r'^-!- A line starting with / is a command; // says')
        for command in ('/nick', '/who', '/me', '/msg', '/quit', '/help'):
            self.assertTrue(any(command in line for line in lines), command)
        alice.send('/frobnicate now\n')
        alice.expect(r'^!!! unknown command /frobnicate \(try /help\)$')
        self.assertEqual(self.sync(bob), [])

    def test_history_is_replayed_to_newcomers(self):
        alice = self.connect('alice')
        for i in range(3):
            alice.send('message %d\n' % i)
        alice.send('/me waves\n')
        self.sync(alice)
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        lines, waves = conn.expect(r'^\[(\S+)\] \* alice waves$')  # with when it was said
        stamp = '[%s] ' % waves.group(1)
        self.assertRegex(stamp, r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] $')
        self.assertLess(abs(calendar.timegm(time.strptime(stamp, '[%Y-%m-%dT%H:%M:%SZ] '))
                            - time.time()), 60)
        self.assertEqual(lines[-4:], ['-!- Last 4 messages:', stamp + '<alice> message 0',
                                      stamp + '<alice> message 1', stamp + '<alice> message 2'])

    def test_an_http_request_never_reaches_the_room(self):
        alice = self.connect('alice')
        for path in ('/', '/' + 'a' * 5000):  # longer than --max-line, too
            probe = Conn(self.srv.port, hello=False)  # what a web page can make a browser send
            self.addCleanup(probe.close)
            probe.send('POST %s HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n'
                       'Content-Length: 26\r\n\r\n/nick webpage\nhello\n/me hi\n' % path)
            answer = probe.expect_closed()  # the web side's short error, nothing else
            self.assertRegex(answer[0], r'^HTTP/1\.1 40[45] ')
            self.assertEqual(answer[-1], 'Method Not Allowed' if path == '/' else 'Not Found')
        self.srv.wait_log(r'127\.0\.0\.1:\d+ HTTP: 404 /aaa')
        self.assertEqual(self.sync(alice), [])  # no message, and no join or leave either

    def test_a_quiet_connection_joins_with_its_first_line(self):
        # Browsers keep spare connections that never speak: no guest for them.
        alice = self.connect('alice')
        quiet = Conn(self.srv.port, hello=False)  # nc: says nothing first
        self.addCleanup(quiet.close)
        self.assertEqual(quiet.expect(r'^-!- ')[1].string, '-!- ' + chat.ENTER_TO_JOIN)
        alice.send('/who\n')
        before, listed = alice.expect(r'^-!- \d+ online')
        self.assertEqual((before, listed.string), ([], '-!- 1 online in #lobby: alice'))
        quiet.send('GET lunch, anyone?\n')  # a chat line, not HTTP: sent as one
        quiet.expect(r'^-!- Welcome, guest-2!')
        alice.expect(r'^-!- guest-2 joined$')
        alice.expect(r'^<guest-2> GET lunch, anyone\?$')

    def test_someone_who_left_and_came_back_at_once_is_last_heard_to_have_come(self):
        ann, ben = self.connect('ann'), self.connect('ben')
        # One go: "hi" tells the first return at once, and so the second
        # leave and return are held, and told together, before "back".
        ann.send('/join #side\n/join #lobby\nhi\n/join #side\n/join #lobby\nback\n')
        before, _ = ben.expect(r'^<ann> back$')
        self.assertEqual(before[-3:], ['<ann> hi', '-!- ann left for #side', '-!- ann joined'])

    def test_leaving_is_announced_with_its_reason(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        bob.sock.shutdown(socket.SHUT_WR)  # half-close: bob still reads
        alice.expect(r'^-!- bob left \(connection closed\)$')
        bob.expect_closed()
        carol.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\1\0\0\0\0\0\0\0')
        carol.close()  # linger 0: the close sends a reset
        alice.expect(r'^-!- carol (lost the connection|left \(connection closed\))$')


class TestProtocolDefaultSelector(ProtocolTests, ServerTestCase):
    pass


class TestProtocolSelectSelector(ProtocolTests, ServerTestCase):
    SELECTOR = selectors.SelectSelector


# --- Server: rooms and the social commands ---------------------------------------

class TestRooms(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def go(self, conn, room):
        """conn joins room; wait until it is there."""
        conn.send('/join %s\n' % room)
        conn.expect(r'^-!- You are in #%s$' % re.escape(room.lstrip('#')))
        conn.expect(r'^-!- \d+ online in #')

    def test_three_in_dev_and_two_in_the_lobby_do_not_hear_each_other(self):
        alice, bob, carol, dave, erin = (self.connect(n) for n in
                                         ('alice', 'bob', 'carol', 'dave', 'erin'))
        for conn in (alice, bob, carol):
            self.go(conn, '#dev')
        alice.send('in dev\n/me waves in dev\n')
        dave.send('in the lobby\n')
        for listener in (bob, carol):
            listener.expect(r'^<alice> in dev$')
            listener.expect(r'^\* alice waves in dev$')
        erin.expect(r'^<dave> in the lobby$')
        for listener, said in ((bob, 'dave'), (carol, 'dave'), (erin, 'alice'), (dave, 'alice')):
            self.assertFalse([l for l in self.sync(listener) if l.startswith(('<' + said,
                                                                               '* ' + said))])
        alice.send('/msg dave across rooms\n')  # private messages reach anyone anywhere
        dave.expect(r'^\[PM from alice\] across rooms$')

    def test_moving_is_announced_and_the_newcomer_gets_the_room(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        self.go(bob, 'dev')
        bob.send('/topic fixing the build\ndev history\n')
        bob.expect(r'^-!- bob set the topic: fixing the build$')
        alice.expect(r'^-!- bob left for #dev$')
        carol.expect(r'^-!- bob left for #dev$')
        self.sync(bob)
        carol.send('/join #dev\n')
        self.assertEqual(carol.expect(r'^-!- You are in #dev$')[0], [])
        self.assertEqual(carol.line(), '-!- Topic of #dev: fixing the build')
        self.assertEqual(carol.line(), '-!- 2 online in #dev: bob, carol')
        self.assertEqual(carol.line(), '-!- Last 1 message:')
        self.assertRegex(carol.line(), r'^\[\S+\] <bob> dev history$')
        bob.expect(r'^-!- carol joined$')
        alice.expect(r'^-!- carol left for #dev$')
        carol.send('/part\n')
        carol.expect(r'^-!- You are in #lobby$')
        bob.expect(r'^-!- carol left for #lobby$')
        carol.send('/part\n/join lobby\n/join #a<b\n/join\n')
        carol.expect(r'^!!! you are in the lobby; /quit leaves the server$')
        carol.expect(r'^!!! you are in #lobby already$')
        carol.expect(r'^!!! cannot make the room #a<b: a room name may hold only letters')
        carol.expect(r'^!!! usage: /join ROOM$')

    def test_an_empty_room_goes_with_its_history(self):
        alice = self.connect('alice')
        self.go(alice, 'tmp')
        alice.send('soon forgotten\n')
        self.go(alice, 'lobby')
        self.assertNotIn(chat.name_key('tmp'), self.srv.server.rooms)
        alice.send('/join tmp\n')
        before, _ = alice.expect(r'^-!- 1 online in #tmp: alice$')
        self.assertNotIn('soon forgotten', ''.join(before + self.sync(alice)))
        alice.send('/topic\n')
        alice.expect(r'^-!- #tmp has no topic$')

    def test_rooms_busiest_first_and_who_in_another_room(self):
        alice, bob, carol, dave = (self.connect(n) for n in ('alice', 'bob', 'carol', 'dave'))
        for conn, room in ((bob, 'dev'), (carol, 'dev'), (dave, 'ops')):
            self.go(conn, room)
        dave.send('/topic pager duty\n')
        dave.expect(r'set the topic')
        alice.send('/rooms\n')
        alice.expect(r'^-!- 3 rooms:$')
        self.assertEqual([alice.line() for _ in range(3)],
                         ['-!-   #dev (2)', '-!-   #lobby (1)', '-!-   #ops (1): pager duty'])
        alice.send('/who #dev\n/who ops\n/who #nope\n/rooms +2\n')
        alice.expect(r'^-!- 2 online in #dev: bob, carol$')
        alice.expect(r'^-!- 1 online in #ops: dave$')
        alice.expect(r'^!!! there is no room #nope \(/rooms lists them\)$')
        alice.expect(r'^!!! there is no page 2: /rooms has 1 page$')

    def test_away_and_back(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        bob.send('/away at lunch\n')
        bob.expect(r'^-!- You are away: at lunch \(/back when you are back\)$')
        alice.send('/who\n/msg bob are you there?\n/whois bob\n')
        alice.expect(r'^-!- 2 online in #lobby: alice, bob \(away\)$')
        alice.expect(r'^\[PM to bob\] are you there\?$')
        alice.expect(r'^-!- bob is away: at lunch$')
        alice.expect(r'^-!- bob: in #lobby, here \d+ s, idle \d+ s, away: at lunch, '
                     r'not encrypted$')
        bob.expect(r'^\[PM from alice\] are you there\?$')  # delivered all the same
        bob.send('/back\n/back\n')
        bob.expect(r'^-!- You are back$')
        bob.expect(r'^!!! you were not away$')
        alice.send('/who\n')
        alice.expect(r'^-!- 2 online in #lobby: alice, bob$')

    def test_ignore_follows_a_rename_and_ends_when_they_leave(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        alice.send('/ignore bob\n/ignore\n')
        alice.expect(r'^-!- You ignore bob: nothing they say reaches you')
        alice.expect(r'^-!- You ignore bob$')
        bob.send('/nick robert\n')
        alice.expect(r'^-!- bob is now known as robert$')  # notices about them still come
        bob.send('hello all\n/me waves\n/msg alice psst\n')
        bob.expect(r'^\[PM to alice\] psst$')  # robert is not told
        carol.expect(r'^<robert> hello all$')
        carol.expect(r'^\* robert waves$')
        carol.send('carol here\n')
        before, _ = alice.expect(r'^<carol> carol here$')
        self.assertEqual(before, [])  # nothing of robert's: public, action or private
        alice.send('/unignore robert\n')
        alice.expect(r'^-!- You hear robert again$')
        bob.send('heard now\n')
        alice.expect(r'^<robert> heard now$')
        alice.send('/ignore robert\n')
        alice.expect(r'^-!- You ignore robert')
        bob.send('/quit\n')
        alice.expect(r'^-!- robert left \(quit\)$')
        alice.send('/ignore\n')
        alice.expect(r'^-!- You ignore no one$')

    def test_reply_answers_the_last_private_message(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        bob.send('/reply nobody yet\n')
        bob.expect(r'^!!! no one to reply to')
        alice.send('/msg bob hi bob\n')
        bob.expect(r'^\[PM from alice\] hi bob$')
        carol.send('/msg bob hi from carol\n')  # the last one
        bob.expect(r'^\[PM from carol\] hi from carol$')
        bob.send('/reply hi carol\n')
        carol.expect(r'^\[PM from bob\] hi carol$')
        self.assertFalse([l for l in self.sync(alice) if 'hi carol' in l])

    def test_motd_is_shown_after_the_welcome_and_on_request(self):
        self.srv.server.motd = ['Welcome to the lab.', 'Be kind.']
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- Welcome, ')
        self.assertEqual([conn.line(), conn.line()], ['-!- Welcome to the lab.', '-!- Be kind.'])
        conn.expect(r'^-!- You are in #lobby$')
        conn.expect(r'^-!- To resume after a lost connection: ')
        conn.send('/motd\n')
        self.assertEqual([conn.line(), conn.line()], ['-!- Welcome to the lab.', '-!- Be kind.'])


class TestOperatorsOfRooms(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'op_password': 'op'}

    def operator(self):
        op = self.connect('op')
        op.send('/op op\n')
        op.expect(r'^-!- op is now an operator$')
        return op

    def test_mute_and_unmute(self):
        op, bob, carol = self.operator(), self.connect('bob'), self.connect('carol')
        op.send('/mute bob\n')
        op.expect(r'^-!- bob is muted$')
        bob.expect(r'^!!! you are muted by op: only private messages to operators go out$')
        bob.send('let me speak\n/me shouts\n/msg carol psst\n/msg op please\n')
        for _ in range(3):
            bob.expect(r'^!!! you are muted by op')
        op.expect(r'^\[PM from bob\] please$')
        self.assertFalse([l for l in self.sync(carol) if 'bob' in l and not l.startswith('-!-')])
        bob.send('/topic BUY CHEAP STUFF\n')  # a topic is said in public too
        bob.expect(r'^!!! you are muted by op')
        self.assertFalse([l for l in self.sync(carol) if 'BUY' in l])
        op.send('/unmute bob\n')
        bob.expect(r'^-!- op lets you speak again$')
        bob.send('thank you\n')
        carol.expect(r'^<bob> thank you$')
        bob.send('/mute carol\n')
        bob.expect(r'^!!! /mute is for operators')

    def test_a_kicked_websocket_gets_nothing_after_its_close_frame(self):
        op = self.operator()
        ws = WsConn(self.srv.port).handshake()
        self.addCleanup(ws.close)
        ws.send_text('/nick webby')
        ws.expect(r'is now known as webby$')
        op.send('/kick webby\nhello after the kick\n')  # one turn: the line follows the kick
        rest = b''
        while True:  # the raw bytes: a reader stops at a close frame, a browser too
            data = ws.sock.recv(65536)
            if not data:
                break
            rest += data
        self.assertIn(b'you were kicked by op', rest)
        self.assertTrue(rest.endswith(chat.close_frame(1000)), rest[-60:])  # RFC 6455:
        self.assertNotIn(b'hello after the kick', rest)                    # nothing after it

    def test_rename_and_wall(self):
        op, bob, carol = self.operator(), self.connect('bob'), self.connect('carol')
        carol.send('/join dev\n')
        carol.expect(r'^-!- You are in #dev$')
        op.send('/rename bob robert\n/rename bob x<\n/wall maintenance at noon\n')
        bob.expect(r'^-!- bob is now known as robert \(renamed by op\)$')
        op.expect(r'^!!! no one called bob is online$')
        for conn in (op, bob, carol):  # every room
            conn.expect(r'^-!- op to everyone: maintenance at noon$')
        op.send('/whois robert\n')
        op.expect(r'^-!- robert: in #lobby, .*, from 127\.0\.0\.1:\d+$')  # operators see where from


class TestRoomFuzz(ServerTestCase):
    """Random joins, parts and messages across 5 rooms and 20 peers: each
    peer must receive exactly the public lines its rooms heard while it was
    there, in order, and nothing else."""
    SERVER_OPTIONS = {'rate': 0, 'history': 0}

    def test_no_line_leaks_between_rooms(self):
        import random
        rng = random.Random(20261201)
        rooms = ['lobby', 'dev', 'ops', 'qa', 'art']
        peers = [self.connect('p%d' % i) for i in range(20)]
        where = ['lobby'] * len(peers)
        expected = [[] for _ in peers]
        for step in range(400):
            i = rng.randrange(len(peers))
            conn = peers[i]
            if rng.random() < 0.3:
                room = rng.choice(rooms)
                conn.send('/join %s\n' % room)
                where[i] = room if room != where[i] else where[i]
            else:
                line = 'm%d' % step
                conn.send(line + '\n')
                for j in range(len(peers)):
                    if j != i and where[j] == where[i]:
                        expected[j].append('<p%d> %s' % (i, line))
            roundtrip(conn)  # handled before the next step
        for i, conn in enumerate(peers):
            roundtrip(conn)
            got = [l for l in conn.seen if l.startswith('<')]
            self.assertEqual(got, expected[i], 'p%d' % i)


class TestTenThousand(unittest.TestCase):
    """/who and /rooms with 10,000 people and 5,000 rooms, over real
    connections: each answer is a page that fits one turn's output share."""

    def test_who_and_rooms_stay_within_the_output_share(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 12000:
            self.fail('needs 12,000 open files; the hard limit here is %d' % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY
                                                    else 65536, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = ServerProcess('--rate=0', '--quiet')
        self.addCleanup(server.stop)
        observer = Conn(server.port)
        self.addCleanup(observer.close)
        observer.expect(r'^-!- 1 online')
        selector = selectors.DefaultSelector()
        self.addCleanup(selector.close)
        socks = []
        for i in range(10000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(('127.0.0.1', server.port))
            self.addCleanup(sock.close)
            greeting = b'\n' + (b'/join r%d\n' % i if i % 2 else b'')
            selector.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, greeting)
            socks.append(sock)

        def pump():  # say each one's lines once it is connected; read and drop what comes
            for key, mask in selector.select(0.05):
                if mask & selectors.EVENT_WRITE and key.data:
                    key.fileobj.send(key.data)
                    selector.modify(key.fileobj, selectors.EVENT_READ, b'')
                if mask & selectors.EVENT_READ:
                    try:
                        key.fileobj.recv(65536)
                    except OSError:
                        pass
        deadline = time.monotonic() + 60
        while True:  # until everyone is where it is going
            self.assertLess(time.monotonic(), deadline, 'no one is where they are going')
            for _ in range(20):
                pump()
            observer.send('/rooms\n')
            header = observer.expect(r'^-!- (\d+) rooms')[1].string
            lobby = observer.line()
            if header.startswith('-!- 5001 rooms') and lobby == '-!-   #lobby (5001)':
                break
        self.assertEqual(header, '-!- 5001 rooms, page 1 of 101 (/rooms +N for page N):')
        page = [observer.line() for _ in range(chat.ROOMS_PAGE - 1)]
        self.assertTrue(all(re.match(r'^-!-   #r\d+ \(1\)$', line) for line in page), page)
        turn_share = chat.MAX_BACKLOG_BYTES // chat.TURN_SHARE
        self.assertLess(len(''.join(page)) * 2, turn_share)
        observer.send('/rooms +101\n/who\n/who +26\n')
        observer.expect(r'^-!- 5001 rooms, page 101 of 101 ')
        observer.expect(r'^-!-   #r\d+ \(1\)$')
        who = observer.expect(r'^-!- 5001 online in #lobby, page 1 of 26 \(/who \+N for page N\): ')
        names = who[1].string.split(': ', 1)[1].split(', ')
        self.assertEqual(len(names), chat.WHO_PAGE_NAMES)
        self.assertLess(len(who[1].string.encode()) * 2, turn_share)
        last = observer.expect(r'^-!- 5001 online in #lobby, page 26 of 26 .*: ')[1]
        self.assertEqual(len(last.string.split(': ', 1)[1].split(', ')), 5001 - 25 * 200)

# --- A real browser: Chromium over the DevTools pipe ---------------------------
#
# With --remote-debugging-pipe, Chromium reads JSON commands from its fd 3 and
# writes replies and events to its fd 4, each message ended by a NUL byte:
# the standard library is enough to drive it.  Every wait has a deadline.

BROWSER_TIMEOUT_SEC = 10.0     # a start takes ~0.5 s here; leave room for slow CI
BROWSER_START_SEC = 30.0       # the first answer, on a machine busy with servers and
                               # Redis: CI once saw 10 s pass
CLOSE_TIMEOUT_SEC = 5.0        # Browser.close ends Chromium in ~0.15 s
POLL_INTERVAL_SEC = 0.02       # wait_for; one evaluate round trip is ~1 ms
PIPE_CHUNK_BYTES = 1 << 16     # one pipe buffer
MAX_QUEUED_EVENTS = 1000       # unwanted events are dropped oldest first
VIEWPORT = (800, 600)          # CSS pixels; screenshots have this size

CHROMIUM_FLAGS = [
    # Since Chromium 132 --headless means the "new" mode (the real browser
    # without a window); the old mode is gone and --headless=old is ignored.
    '--headless', '--disable-gpu', '--remote-debugging-pipe',
    '--no-sandbox',                 # root cannot use Chromium's sandbox
    '--disable-dev-shm-usage',      # containers often have a 64 MiB /dev/shm
    # The network is closed here: stop Chromium's own calls home.
    '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--disable-quic', '--disable-extensions',
    '--no-first-run', '--no-default-browser-check', '--mute-audio', '--hide-scrollbars',
]

# Popen can place fds only at 0, 1 and 2, and a preexec_fn that dup2()s them
# to 3 and 4 is unsafe when threads run (the tests serve HTTP from one).  So
# sh gets Chromium's pipe ends as stdin and stdout and moves them to 3 and 4
# before exec'ing Chromium: no Python code runs between fork and exec.
FD_TRAMPOLINE = 'exec 3<&0 4>&1 0</dev/null 1>&2; exec "$0" "$@"'

# key (which for these keys is also the code): (windowsVirtualKeyCode, text).
# A key with text is sent as 'keyDown', so Chromium also fires keypress: the
# '\r' keypress is what submits a form.
KEYS = {'Enter': (13, '\r'), 'Tab': (9, ''), 'Backspace': (8, ''),
        'ArrowUp': (38, ''), 'ArrowDown': (40, '')}

class CDPError(Exception):
    """Chromium refused a command or went away, or the page's JavaScript threw."""


def wait_ready(fd, for_write, deadline, what):
    """Wait until fd is readable (or writable); AssertionError at the deadline."""
    # Past the deadline still look once: the answer may already be there.
    remaining = max(0, deadline - time.monotonic())
    readers, writers = ([], [fd]) if for_write else ([fd], [])
    if not any(select.select(readers, writers, [], remaining)):
        raise AssertionError('timed out waiting for ' + what)


def describe_exception(details):
    """Return the message of a Runtime exceptionDetails, with its stack if any."""
    exception = details.get('exception') or {}
    return exception.get('description') or details.get('text', 'exception')


def describe_remote_object(remote):
    """Return a Runtime RemoteObject as console.log would show it."""
    if 'value' in remote and not isinstance(remote['value'], str):
        return json.dumps(remote['value'])   # null, true, 42
    # Objects, functions, undefined and NaN come without a value.
    return remote.get('value', remote.get('description', remote['type']))


class Browser:
    """One headless Chromium with one attached page, driven over the pipe."""

    def __init__(self, timeout=BROWSER_TIMEOUT_SEC):
        self.timeout = timeout
        self.console_messages = []    # console calls, uncaught exceptions, dialogs
        self._events = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._inbuf = bytearray()     # bytes read but not yet a whole message
        self._last_id, self._session = 0, None
        self._proc = self._to_chromium = self._from_chromium = None
        self._profile_dir = tempfile.mkdtemp(prefix='cdp-profile-')
        self._stderr_log = os.path.join(self._profile_dir, 'stderr.log')
        try:
            self._start_chromium()
            self._attach_page()
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        """Return the browser itself, for with-statements."""
        return self

    def __exit__(self, *exc_info):
        """Close the browser, whether or not the block raised."""
        self.close()

    def _start_chromium(self):
        """Start Chromium with its fds 3 and 4 on two new pipes."""
        child_reads, self._to_chromium = os.pipe()
        self._from_chromium, child_writes = os.pipe()
        try:
            with open(self._stderr_log, 'wb') as stderr:
                self._proc = subprocess.Popen(
                    ['/bin/sh', '-c', FD_TRAMPOLINE, need('chromium')] + CHROMIUM_FLAGS
                    + ['--user-data-dir=' + self._profile_dir, 'about:blank'],
                    stdin=child_reads, stdout=child_writes, stderr=stderr,
                    start_new_session=True)   # a group close() can kill whole
        finally:
            os.close(child_reads)
            os.close(child_writes)
        os.set_blocking(self._to_chromium, False)
        os.set_blocking(self._from_chromium, False)

    def _attach_page(self):
        """Open a page target, route later commands to it, enable its events."""
        target = self.send('Target.createTarget', {'url': 'about:blank'}, session=False,
                           timeout=BROWSER_START_SEC)
        self._session = self.send('Target.attachToTarget', {
            'targetId': target['targetId'], 'flatten': True}, session=False)['sessionId']
        # New headless mode keeps room for a tab strip and toolbar inside the
        # window (--window-size=800,600 gave an 800x513 page): size the page itself.
        self.send('Emulation.setDeviceMetricsOverride', {'width': VIEWPORT[0],
                  'height': VIEWPORT[1], 'deviceScaleFactor': 1, 'mobile': False})
        self.send('Page.enable')
        self.send('Runtime.enable')

    # --- Protocol ---

    def send(self, method, params=None, session=True, timeout=None):
        """Send one command, to the page unless session=False; return its result."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        command_id = self._post(method, params, session, deadline)
        # Other ids answer commands that timed out earlier: nobody waits for them.
        reply = self._read_message(deadline, 'reply to ' + method)
        while reply.get('id') != command_id:
            reply = self._read_message(deadline, 'reply to ' + method)
        if 'error' in reply:
            raise CDPError('%s: %s' % (method, reply['error'].get('message')))
        return reply['result']

    def wait_event(self, method, timeout=None):
        """Return the params of the page's next event named method, queued or new."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for event in self._events:
                if event['method'] == method and event.get('sessionId') == self._session:
                    self._events.remove(event)
                    return event['params']
            self._read_message(deadline, method)   # which queues any event

    def _post(self, method, params, session, deadline):
        """Write one command to Chromium's fd 3 by the deadline; return its id."""
        self._last_id += 1
        message = {'id': self._last_id, 'method': method, 'params': params or {}}
        if session:
            message['sessionId'] = self._session
        unsent = memoryview(json.dumps(message).encode('utf-8') + b'\0')
        while unsent:
            wait_ready(self._to_chromium, True, deadline, 'Chromium to read ' + method)
            try:
                unsent = unsent[os.write(self._to_chromium, unsent):]
            except BrokenPipeError:
                raise self._chromium_gone(method)
        return self._last_id

    def _read_message(self, deadline, what):
        """Return the next message from Chromium's fd 4, reading by the deadline."""
        end = self._inbuf.find(b'\0')
        while end < 0:
            wait_ready(self._from_chromium, False, deadline, what)
            chunk = os.read(self._from_chromium, PIPE_CHUNK_BYTES)
            if not chunk:
                raise self._chromium_gone(what)
            scanned = len(self._inbuf)
            self._inbuf += chunk
            end = self._inbuf.find(b'\0', scanned)
        message = json.loads(self._inbuf[:end].decode('utf-8'))
        del self._inbuf[:end + 1]
        if 'method' in message:
            self._events.append(message)
            self._note_event(message)
        return message

    def _note_event(self, message):
        """Keep the text of console calls, uncaught exceptions and dialogs."""
        params = message['params']
        if message['method'] == 'Runtime.consoleAPICalled':
            self.console_messages.append('%s: %s' % (params['type'], ' '.join(
                describe_remote_object(arg) for arg in params['args'])))
        elif message['method'] == 'Runtime.exceptionThrown':
            self.console_messages.append(
                'exception: ' + describe_exception(params['exceptionDetails']))
        elif message['method'] == 'Page.javascriptDialogOpening':
            # An open alert() blocks the page and every wait after it: close
            # it now.  send() skips the reply, as it does any unknown id.
            self.console_messages.append('%s: %s' % (params['type'], params['message']))
            self._post('Page.handleJavaScriptDialog', {'accept': True}, True,
                       time.monotonic() + self.timeout)

    def _chromium_gone(self, what):
        """Return the error for a pipe Chromium closed, with its last words."""
        with open(self._stderr_log, 'rb') as stderr:
            last_lines = b''.join(stderr.readlines()[-10:]).decode('utf-8', 'replace')
        return CDPError('Chromium closed the pipe during %s; its stderr ends:\n%s'
                        % (what, last_lines))

    # --- Page ---

    def goto(self, url):
        """Navigate the page to url and wait for its load event."""
        self._events.clear()   # an earlier page's load event must not answer
        result = self.send('Page.navigate', {'url': url})
        if result.get('errorText'):
            raise CDPError('%s: %s' % (url, result['errorText']))
        if 'loaderId' in result:   # absent for #fragment moves: no load event
            self.wait_event('Page.loadEventFired')

    def evaluate(self, expression):
        """Return the JSON value of a JS expression, awaited if it is a promise."""
        result = self.send('Runtime.evaluate', {
            'expression': expression, 'returnByValue': True, 'awaitPromise': True})
        if 'exceptionDetails' in result:
            raise CDPError('%s threw %s' % (
                expression, describe_exception(result['exceptionDetails'])))
        return result['result'].get('value')

    def wait_for(self, expression, what, timeout=None):
        """Evaluate expression until it is truthy and return that value."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError('timed out waiting for ' + what)
            time.sleep(POLL_INTERVAL_SEC)

    def insert_text(self, text):
        """Type text into the focused element, as a paste or an IME commit does."""
        self.send('Input.insertText', {'text': text})

    def press(self, key):
        """Press and release one key named in KEYS in the focused element."""
        key_code, text = KEYS[key]
        event = {'key': key, 'code': key, 'windowsVirtualKeyCode': key_code,
                 'text': text, 'unmodifiedText': text}
        self.send('Input.dispatchKeyEvent', dict(event, type='keyDown' if text else 'rawKeyDown'))
        self.send('Input.dispatchKeyEvent', dict(event, type='keyUp'))

    def compose(self, text):
        """Show text as an uncommitted IME composition, like a half-typed syllable."""
        # While it lasts, press('Enter') gives a keydown with isComposing true
        # but keyCode 13, and its keypress submits a form with the unfinished
        # text unless the keydown is cancelled.  A real IME's keydown has key
        # 'Process', keyCode 229 and no keypress: send a 'rawKeyDown' with
        # those to imitate it.  Neither ends the composition.
        end = len(text.encode('utf-16-le')) // 2   # DOM offsets count UTF-16 units
        self.send('Input.imeSetComposition', {
            'text': text, 'selectionStart': end, 'selectionEnd': end})

    def commit_composition(self, text):
        """Replace the current IME composition with text and end it."""
        self.send('Input.insertText', {'text': text})

    def screenshot(self, path):
        """Save a PNG of the page's viewport to path."""
        png = self.send('Page.captureScreenshot', {'format': 'png'})['data']
        with open(path, 'wb') as out:
            out.write(base64.b64decode(png))

    # --- Shutdown ---

    def close(self):
        """Quit Chromium, reap it, close the pipes and remove the profile; idempotent."""
        if self._proc is not None:
            self._ask_chromium_to_quit()
            # The leader is not reaped yet, so its pid still names the group:
            # this kills the helpers (zygotes) that outlive it, or all on a hang.
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        for fd in (self._to_chromium, self._from_chromium):
            if fd is not None:
                os.close(fd)
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir)
        self._proc = self._to_chromium = self._from_chromium = self._profile_dir = None

    def _ask_chromium_to_quit(self):
        """Send Browser.close and read until Chromium exits and its pipe ends."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_SEC
        try:
            self._post('Browser.close', None, False, deadline)
            while True:
                wait_ready(self._from_chromium, False, deadline, 'Chromium to exit')
                if not os.read(self._from_chromium, PIPE_CHUNK_BYTES):
                    return
        except (AssertionError, CDPError):
            pass   # hung or gone already: close() kills it


# --- The web side: HTTP and WebSocket --------------------------------------------

def http_get(port, request, tls=False):
    """Send a raw HTTP request; the whole answer (until the server closes)."""
    conn = TlsConn(port, hello=False) if tls else Conn(port, hello=False)
    try:
        conn.send(request)
        conn.sock.settimeout(TIMEOUT)
        data = bytearray(conn.buf)
        while True:
            chunk = conn.sock.recv(65536)
            if not chunk:
                return bytes(data)
            data += chunk
    finally:
        conn.close()


def response_parts(data):
    """(status, headers, body) of an HTTP response."""
    head, _, body = data.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.split(': ', 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


class WsConn:
    """A WebSocket peer speaking raw frames, as a browser would (with an
    Origin, unless given None), through chat.py's own sans-I/O reader."""

    def __init__(self, port, origin='self', tls=False, host=None, handshake=None):
        self.conn = TlsConn(port, hello=False) if tls else Conn(port, hello=False)
        self.sock = self.conn.sock
        host = host or '127.0.0.1:%d' % port
        if origin == 'self':
            origin = '%s://%s' % ('https' if tls else 'http', host)
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = handshake or (
            'GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
            'Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n'
            % (host, key, 'Origin: %s\r\n' % origin if origin else ''))
        self.reader = chat.WebSocketReader(1 << 20, client_side=True)
        self.events = []
        self.key = key

    def open(self, byte_at_a_time=False):
        """Send the handshake; the response head."""
        data = self.request.encode()
        for piece in ([data[i:i + 1] for i in range(len(data))] if byte_at_a_time else [data]):
            self.sock.sendall(piece)
        head = b''
        while b'\r\n\r\n' not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            head += chunk
        return head

    def handshake(self):
        head = self.open()
        assert head.startswith(b'HTTP/1.1 101 '), head
        return self

    def send_text(self, text):
        self.sock.sendall(chat.client_text_frame(text))

    def send(self, data):
        self.sock.sendall(data)

    def event(self, timeout=TIMEOUT):
        """The next event from the server: ('text', line), ('ping', b''), ('close', code, ''), ..."""
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError('no frame within %ss' % timeout)
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError('closed by the server without a close frame')
            self.events += self.reader.feed(data)
        return self.events.pop(0)

    def expect(self, pattern):
        """Read text frames until one matches; the lines before it."""
        before = []
        while True:
            event = self.event()
            if event[0] == 'ping':  # an idle socket is pinged now and then
                self.send(chat.encode_frame(chat.OP_PONG, event[1], b'mask'))
                continue
            assert event[0] == 'text', event
            if re.search(pattern, event[1]):
                return before
            before.append(event[1])

    def expect_close(self):
        """Read until the close frame; its code."""
        return self.expect_event('close')[1]

    def expect_event(self, kind):
        """Read until an event of kind (text lines aside); that event."""
        while True:
            event = self.event()
            if event[0] == kind:
                return event

    def close(self):
        self.conn.close()


class TestWeb(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def ws(self, name=None, **kw):
        ws = WsConn(self.srv.port, **kw).handshake()
        self.addCleanup(ws.close)
        ws.expect(r'^-!- \d+ online in #lobby')
        if name:
            ws.send_text('/nick %s' % name)
            ws.expect(r'is now known as %s$' % name)
        return ws

    def test_the_page_with_its_security_headers(self):
        status, headers, body = response_parts(http_get(
            self.srv.port, 'GET /?room=dev HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n' % self.srv.port))
        self.assertEqual(status, 200)
        self.assertEqual(body, chat.PAGE.encode())
        self.assertEqual(headers['Content-Type'], 'text/html; charset=utf-8')
        csp = headers['Content-Security-Policy']
        self.assertIn("connect-src 'self' ws://127.0.0.1:%d" % self.srv.port, csp)
        self.assertIn("script-src 'sha256-", csp)
        self.assertIn("default-src 'none'", csp)
        for name, value in (('X-Content-Type-Options', 'nosniff'),
                            ('Referrer-Policy', 'no-referrer'), ('X-Frame-Options', 'DENY'),
                            ('Connection', 'close')):
            self.assertEqual(headers[name], value)
        status, headers, body = response_parts(http_get(self.srv.port,
                                                        'HEAD / HTTP/1.1\r\nHost: x\r\n\r\n'))
        self.assertEqual((status, body), (200, b''))
        self.assertEqual(int(headers['Content-Length']), len(chat.PAGE.encode()))

    def test_every_other_request_gets_a_short_error_and_the_room_hears_nothing(self):
        alice = self.connect('alice')
        for request, status in (('GET /admin HTTP/1.1\r\nHost: x\r\n\r\n', 404),
                                ('POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nhi\n', 405),
                                ('GET / HTTP/1.1\r\n\r\n', 400),  # no Host
                                ('GET / HTTP/1.1\r\nBad header\r\n\r\n', 400),
                                ('GET /ws HTTP/1.1\r\nHost: x\r\n\r\n', 400),  # not an upgrade
                                ('GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n', 404),  # off
                                ('GET / HTTP/1.1\r\nHost: x\r\nX: %s\r\n\r\n' % ('y' * 9000), 431)):
            answer = http_get(self.srv.port, request)
            self.assertEqual(response_parts(answer)[0], status, request[:40])
            self.assertIn(b'Connection: close', answer)
            self.assertIn(b'X-Content-Type-Options: nosniff', answer)
        self.assertEqual(self.sync(alice), [])  # no join, no leave, no line

    def test_a_slow_request_head_is_dropped(self):
        patch_constant(self, 'HTTP_HEAD_SEC', 0.3)
        slow = Conn(self.srv.port, hello=False)
        self.addCleanup(slow.close)
        slow.send('GET / HTTP/1.1\r\nHost: x\r\n')  # and never the blank line
        self.assertEqual(slow.expect_closed(), [])
        self.srv.wait_log(r'dropped 127\.0\.0\.1:\d+: no HTTP request in 0 s')

    def test_a_websocket_and_nc_chat_in_one_room(self):
        bob = self.connect('bob')
        ws = self.ws('\uc6f9')
        bob.expect(came('\uc6f9'))
        ws.send_text('hello from the web \U0001f600')
        bob.expect('^<\uc6f9> hello from the web \U0001f600$')
        bob.send('hi web\n')
        ws.expect(r'^<bob> hi web$')
        ws.send_text('/join dev')
        ws.expect(r'^-!- You are in #dev$')
        bob.expect('^-!- \uc6f9 left for #dev$')

    def test_the_handshake_a_byte_at_a_time(self):
        ws = WsConn(self.srv.port)
        self.addCleanup(ws.close)
        head = ws.open(byte_at_a_time=True)
        self.assertIn(('Sec-WebSocket-Accept: %s' % chat.websocket_accept(ws.key)).encode(), head)
        ws.expect(r'^-!- Welcome, ')

    def test_origins(self):
        for origin, allowed in (('http://evil.example', False), (None, True),
                                ('null', False), ('self', True)):
            ws = WsConn(self.srv.port, origin=origin)
            self.addCleanup(ws.close)
            head = ws.open()
            self.assertEqual(head.startswith(b'HTTP/1.1 101'), allowed, (origin, head))
            if not allowed:
                self.assertTrue(head.startswith(b'HTTP/1.1 403 Forbidden'), head)

    def test_a_listed_origin_may_open_it(self):
        self.srv.server.web.origins.append('https://chat.example.org')
        ws = WsConn(self.srv.port, origin='https://chat.example.org:443')
        self.addCleanup(ws.close)
        self.assertTrue(ws.open().startswith(b'HTTP/1.1 101'))

    def test_close_codes(self):
        cases = [
            (chat.encode_frame(chat.OP_TEXT, b'unmasked'), 1002),
            (b'\xc1\x80' + b'\0' * 4, 1002),                      # a reserved bit
            (b'\x83\x80' + b'\0' * 4, 1002),                      # opcode 3
            (chat.encode_frame(chat.OP_BINARY, b'\1\2', b'abcd'), 1003),
            (chat.encode_frame(chat.OP_TEXT, b'caf\xc3 \xff', b'abcd'), 1007),
            (chat.encode_frame(chat.OP_TEXT, b'x' * (chat.MAX_LINE_BYTES + 1), b'abcd'), 1009),
            (chat.encode_frame(chat.OP_PING, b'p' * 126, b'abcd'), 1002),  # control over 125
        ]
        for frame, code in cases:
            ws = self.ws()
            ws.send(frame)
            self.assertEqual(ws.expect_close(), code, frame[:8])

    def test_fragments_with_a_ping_between_and_the_limit_over_fragments(self):
        ws = self.ws('frag')
        bob = self.connect('bob')
        ws.expect(came('bob'))  # announced: nothing of it comes between the frames and the pong
        mask = b'mask'
        ws.send(chat.encode_frame(chat.OP_TEXT, '\ud55c'.encode()[:2], mask, fin=False)
                + chat.encode_frame(chat.OP_PING, b'still there?', mask)
                + chat.encode_frame(chat.OP_CONT, '\ud55c'.encode()[2:] + b' in three',
                                    mask, fin=False)
                + chat.encode_frame(chat.OP_CONT, b' parts', mask))
        self.assertEqual(ws.event(), ('pong', b'still there?'))
        bob.expect('^<frag> \ud55c in three parts$')
        half = chat.MAX_LINE_BYTES // 2 + 1
        ws.send(chat.encode_frame(chat.OP_TEXT, b'x' * half, mask, fin=False)
                + chat.encode_frame(chat.OP_CONT, b'x' * half, mask))
        self.assertEqual(ws.expect_close(), 1009)

    def test_the_close_handshake_both_ways(self):
        ws, bob = self.ws('leaver'), self.connect('bob')
        ws.send(chat.encode_frame(chat.OP_CLOSE, struct.pack('!H', 1000) + b'bye', b'mask'))
        self.assertEqual(ws.expect_close(), 1000)  # echoed
        bob.expect(r'^-!- leaver left \(connection closed\)$')
        quitter = self.ws('quitter')
        quitter.send_text('/quit')
        quitter.expect(r'^-!- Goodbye$')
        self.assertEqual(quitter.expect_close(), 1000)

    def test_an_idle_websocket_is_pinged_and_dropped_when_it_stops_answering(self):
        # answering answers one ping: the next drops it too, WS_PING_SEC * 1.5
        # after its answer, the margin the test has to see silent dropped first
        patch_constant(self, 'WS_PING_SEC', 3.0)
        answering, silent = self.ws('answering'), self.ws('silent')
        self.assertEqual(answering.expect_event('ping'), ('ping', b''))
        answering.send(chat.encode_frame(chat.OP_PONG, b'', b'mask'))
        self.assertEqual(silent.expect_event('ping'), ('ping', b''))  # pinged before dropped
        self.srv.wait_log(r'silent did not answer a ping')
        self.srv.wait_log(r'silent lost the connection \(no answer to ping\)')
        answering.send_text('/who')
        answering.expect(r'^-!- 2 online in #lobby: answering, silent \(lost\)$')  # may resume

    def test_a_turns_lines_are_framed_once_for_every_websocket(self):
        talker = self.connect('talker')
        listeners = [self.ws('w%d' % i) for i in range(4)]
        talker.expect(r'^-!- (\d people joined: .*\bw3\b|w3 joined$|\S+ is now known as w3$)')
        roundtrip(talker)
        server = self.srv.server
        sent, send_fresh = [], server.send_fresh
        server.send_fresh = lambda peer, data: (sent.append(data), send_fresh(peer, data))
        talker.send('once\nfor all\n')
        for ws in listeners:
            ws.expect(r'^<talker> for all$')
        framed = [data for data in sent if data.startswith(b'\x81')]
        self.assertEqual(len(framed), 4)
        for data in framed:
            self.assertIs(data, framed[0])

    def test_password_and_flood_control_apply_to_websockets(self):
        self.srv.server.gate.password = 'sesame'
        self.srv.server.rate, self.srv.server.burst = 2, 2
        ws = WsConn(self.srv.port).handshake()
        self.addCleanup(ws.close)
        ws.expect(re.escape(chat.PASSWORD_PROMPT))
        ws.send_text('/pass sesame')
        ws.expect(r'^-!- \d+ online')
        for i in range(4):
            ws.send_text('line %d' % i)
        ws.expect(r'^-!- flood control: your lines wait, 2 per second$')


class TestWebOptions(unittest.TestCase):

    def test_no_web_closes_http_unheard_and_metrics_when_asked(self):
        server = ServerProcess('--no-web')
        self.addCleanup(server.stop)
        self.assertEqual(http_get(server.port, 'GET / HTTP/1.1\r\nHost: x\r\n\r\n'), b'')
        self.assertNotIn('in a browser', server.banner + server.proc.stdout.readline()
                         + server.proc.stdout.readline())
        server = ServerProcess('--metrics')
        self.addCleanup(server.stop)
        listener = Conn(server.port)
        self.addCleanup(listener.close)
        listener.expect(r'^-!- 1 online')
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- 2 online')
        conn.send('hello\nworld\n')  # one read: one blob of two lines
        listener.expect(r'^<\S+> world$')
        status, headers, body = response_parts(http_get(server.port,
                                                         'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n'))
        self.assertEqual(status, 200)
        text = body.decode()
        for line in ('chat_peers 2', 'chat_rooms 1', '# TYPE chat_bytes_out_total counter',
                     'chat_lines_out_total 3'):  # the listener's: a join, hello, world
            self.assertIn(line, text)
        self.assertRegex(text, r'chat_lines_in_total [1-9]')
        self.assertRegex(text, r'chat_loop_turn_seconds_max \d')

    sync = ServerTestCase.sync

    def test_https_and_wss_with_tls(self):
        cert, key, _ = certificate()
        server = ServerProcess('--tls-cert', cert, '--tls-key', key)
        self.addCleanup(server.stop)
        self.assertIn('or open https://127.0.0.1:%d/ in a browser' % server.port,
                      server.proc.stdout.readline() + server.proc.stdout.readline()
                      + server.proc.stdout.readline())
        status, headers, _ = response_parts(http_get(
            server.port, 'GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n' % server.port, tls=True))
        self.assertEqual(status, 200)
        self.assertIn("connect-src 'self' wss://127.0.0.1:%d" % server.port,
                      headers['Content-Security-Policy'])
        ws = WsConn(server.port, tls=True).handshake()
        self.addCleanup(ws.close)
        ws.expect(r'^-!- Welcome, ')


# --- Sessions that resume ---------------------------------------------------------

RESUME_LINE = r'^-!- To resume after a lost connection: /resume (\S+)$'


def cut(conn):
    """Reset conn's connection, as a network that fails does."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    conn.sock.close()


class CuttableProxy:
    """A TCP relay on loopback between clients and a server, whose
    connections the test can cut (a reset both ways) while the server and
    the clients go on: a Wi-Fi that drops."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.relay, daemon=True)
        self.running = True
        self.refusing = False  # True: new connections are reset at once (no network)
        self.trip = None  # bytes: the first chunk to the server holding them cuts instead
        self.refuse_after_trip = False  # True: the trip sets refusing too, in the same step
        self.hold = None  # bytes: a chunk to the client holding them waits, and what
        self.held = None  # follows on its connection, until release(): [pair, bytes]
        self.thread.start()

    def relay(self):
        while self.running:
            with self.lock:
                socks = [self.listener] + [s for pair in self.pairs for s in pair]
            try:
                ready = select.select(socks, [], [], 0.05)[0]
            except (OSError, ValueError):
                continue  # a socket cut meanwhile
            for sock in ready:
                if sock is self.listener:
                    client, _ = sock.accept()
                    if self.refusing:
                        self.cut((client,))
                        continue
                    with self.lock:
                        self.pairs.append((client, socket.create_connection(
                            ('127.0.0.1', self.target))))
                    continue
                with self.lock:
                    pair = next((p for p in self.pairs if sock in p), None)
                if pair is None:
                    continue
                other = pair[1] if sock is pair[0] else pair[0]
                try:
                    data = sock.recv(65536)
                    if self.trip and sock is pair[0] and self.trip in data:
                        self.trip = None
                        self.refusing = self.refusing or self.refuse_after_trip
                        data = b''
                    with self.lock:
                        if self.hold and sock is pair[1] and self.hold in data:
                            self.hold, self.held = None, [pair, b'']
                        if self.held and self.held[0] is pair and data:
                            self.held[1] += data
                            continue
                    if data:
                        other.sendall(data)
                        continue
                except OSError:
                    pass
                self.cut(pair)

    def release(self):
        """What hold held goes on."""
        with self.lock:
            (client, _), data = self.held
            self.held = None
            client.sendall(data)

    def cut(self, pair=None):
        """Reset one pair of connections, or all."""
        with self.lock:
            pairs = [pair] if pair else list(self.pairs)
            for one in pairs:
                if one in self.pairs:
                    self.pairs.remove(one)
                for sock in one:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack('ii', 1, 0))
                    except OSError:
                        pass
                    sock.close()

    def stop(self):
        self.running = False
        self.thread.join(TIMEOUT)
        self.cut()
        self.listener.close()


class SessionPeers:
    """Peers that keep their resume token, and connections that resume."""

    def session(self, name):
        """A peer named name, and its resume token; lines after it are counted."""
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        token = conn.expect(RESUME_LINE)[1].group(1)
        conn.send('/nick %s\n' % name)
        conn.expect(r'is now known as %s$' % name)
        conn.name = name
        for other in self.conns:
            other.expect(came(name))
        self.conns.append(conn)
        return conn, token

    def lost_one(self, watcher='bob'):
        """ann's connection and token, once the connection is cut while
        watcher (returned too) looks on."""
        ann, token = self.session('ann')
        other = self.connect(watcher)
        self.cut_off(ann, other)
        return ann, token, other

    @staticmethod
    def since_token(conn):
        """The lines conn has read since its last resume token: what a client
        counts.  (Someone's arrival is one line or two: "bob joined", or a
        guest's joining and its rename, as the notice's timing fell.)"""
        last = max(n for n, text in enumerate(conn.seen) if re.match(RESUME_LINE, text))
        return conn.seen[last + 1:]

    def cut_off(self, conn, watcher):
        """Reset conn's connection; watcher hears that it was lost."""
        cut(conn)
        watcher.expect(r'^-!- %s lost the connection$' % conn.name)

    def resume(self, token, seen=None, then=''):
        """A new connection whose first line is /resume TOKEN [SEEN], and then."""
        conn = Conn(self.srv.port, hello=False)
        self.addCleanup(conn.close)
        conn.send('/resume %s%s\n%s' % (token, '' if seen is None else ' %d' % seen, then))
        return conn


class TestSessions(SessionPeers, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def test_a_cut_connection_resumes_with_exactly_the_lines_it_missed(self):
        ann, token = self.session('ann')
        bob = self.connect('bob')
        bob.send(''.join('line %d\n' % n for n in range(5)))
        for n in range(2):  # the other three wait, unread, in ann's socket
            ann.expect(r'^<bob> line %d$' % n)
        seen = len(self.since_token(ann))  # its rename, bob's arrival, these two
        roundtrip(bob)
        self.cut_off(ann, bob)
        bob.send('/who\n')
        bob.expect(r'^-!- 2 online in #lobby: ann \(lost\), bob$')  # the name waits
        bob.send('said while ann was away\n/msg ann are you there?\n')
        bob.expect(r'^\[PM to ann\] are you there\?$')
        bob.expect(r'^-!- ann lost the connection: it gets this if it comes back$')
        back = self.resume(token, seen, then='said with the resume\n')  # one packet
        self.assertEqual(back.line(), '-!- You are back as ann in #lobby: 5 lines you missed')
        self.assertEqual([back.line() for _ in range(5)], [
            '<bob> line 2', '<bob> line 3', '<bob> line 4', '<bob> said while ann was away',
            '[PM from bob] are you there?'])
        # The new token comes after what was missed: the client counts from it.
        new_token = re.match(RESUME_LINE, back.line()).group(1)
        self.assertNotEqual(new_token, token)
        bob.expect(r'^-!- ann is back$')  # before anything it says
        bob.expect(r'^<ann> said with the resume$')
        back.send('/msg ann sync\n')
        self.assertEqual(back.expect(r'^\[PM from ann\] sync$')[0], [])  # nothing twice
        bob.send('live again\n')
        back.expect(r'^<bob> live again$')
        self.srv.wait_log(r'ann resumed from 127\.0\.0\.1:\d+ \(5 lines\)')

    def test_the_count_holds_across_rooms_and_private_lines(self):
        ann, token = self.session('ann')
        bob = self.connect('bob')
        ann.send('/join dev\n')
        ann.expect(r'^-!- 1 online in #dev: ann$')
        bob.send('/join dev\n/msg ann psst\n')
        ann.expect(r'^\[PM from bob\] psst$')
        bob.send('in dev 1\nin dev 2\n')
        ann.expect(r'^<bob> in dev 1$')
        self.cut_off(ann, bob)
        back = self.resume(token, len(self.since_token(ann)))  # the second line unread
        self.assertEqual([back.line(), back.line()], [
            '-!- You are back as ann in #dev: 1 line you missed', '<bob> in dev 2'])
        self.assertRegex(back.line(), RESUME_LINE)

    def test_a_used_or_made_up_token_is_refused(self):
        ann, token = self.session('ann')
        cut(ann)
        first = self.resume(token)
        first.expect(r'^-!- You are back as ann')
        for guess in (token, 'A' * 22, token + ' 0'):  # replaced at each resume
            thief = self.resume(guess)
            self.assertEqual(thief.line(), '!!! cannot resume: no such session (it may have '
                                           'ended or expired)')
            self.assertRegex(thief.line(), r'^-!- Welcome, guest-\d+!')  # a newcomer, then

    def test_a_person_resumes_with_what_was_said_while_away(self):
        ann, token = self.session('ann')
        bob = self.connect('bob')
        bob.send('before\n')
        ann.expect(r'^<bob> before$')
        self.cut_off(ann, bob)
        bob.send('after\n')
        roundtrip(bob)
        back = self.resume(token)  # nc: the token as it was shown
        self.assertEqual([back.line(), back.line()], [
            '-!- You are back as ann in #lobby: 1 line you missed', '<bob> after'])
        self.assertRegex(back.line(), RESUME_LINE)

    def test_quit_kick_and_a_closed_connection_end_the_session(self):
        ann, token = self.session('ann')
        bob = self.connect('bob')
        ann.send('/quit bye\n')
        bob.expect(r'^-!- ann left \(quit: bye\)$')
        self.conns.remove(ann)
        cat, cat_token = self.session('cat')
        cat.sock.shutdown(socket.SHUT_WR)  # nc's Ctrl-D: leaving, not lost
        bob.expect(r'^-!- cat left \(connection closed\)$')
        for used in (token, cat_token):
            again = self.resume(used)
            again.expect(r'^!!! cannot resume')

    def test_a_websocket_resumes_too(self):
        ann, token, bob = self.lost_one()
        arrival = self.since_token(ann)[1:]  # after its rename: bob's arrival
        bob.send('for the browser\n')
        roundtrip(bob)
        ws = WsConn(self.srv.port).handshake()  # a page is let in at its handshake
        self.addCleanup(ws.close)
        ws.expect(RESUME_LINE)
        ws.send_text('/resume %s 1' % token)  # as if it had had its rename only
        missed = arrival + ['<bob> for the browser']
        ws.expect(r'^-!- You are back as ann in #lobby: %d lines you missed$' % len(missed))
        self.assertEqual([ws.event()[1] for _ in missed], missed)
        bob.expect(r'^-!- ann is back$')
        self.assertEqual(self.sync(bob), [])  # the guest it was for a moment went unannounced


class TestSessionsBounded(SessionPeers, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'max_backlog': 16 * 1024}

    def test_sessions_keep_a_bounded_share_of_private_lines(self):
        ann, token, bob = self.lost_one()
        said = ['note %03d %s' % (number, 'p' * 90) for number in range(400)]  # 40 KB
        bob.send(''.join('/msg ann %s\n' % text for text in said))
        bob.expect(r'^\[PM to ann\] note 399 ')
        back = self.resume(token, len(self.since_token(ann)))
        _, notice = back.expect(r'^-!- You are back as ann in #lobby: (\d+) lines you '
                                r'missed \(about (\d+) more are gone\)$')
        missed, gone = int(notice.group(1)), int(notice.group(2))
        self.assertLess(missed * 100, 16 * 1024 // 2)  # RESUME_SHARE of the backlog cap
        self.assertEqual(missed + gone, 400)
        lines = [back.line() for _ in range(missed)]
        self.assertEqual(lines[-1], '[PM from bob] ' + said[-1])


class TestSessionsEnd(SessionPeers, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'op_password': 'op'}

    def test_a_ban_ends_a_lost_session(self):
        _, token, op = self.lost_one('op')
        op.send('/op op\n')
        op.expect(r'^-!- op is now an operator$')
        op.send('/ban ann\n')
        op.expect(r'^-!- ann left \(banned by op\)$')
        back = self.resume(token)
        back.expect(r'^!!! cannot resume')

    def test_counts_that_are_not_numbers_are_refused_and_a_long_first_line_lets_it_in(self):
        _, token, bob = self.lost_one()
        odd = self.resume(token + ' \u00b2')
        odd.expect(r'^!!! cannot resume: no such session')
        odd.expect(r'^-!- Welcome, guest-\d+!')  # a newcomer, then
        long = Conn(self.srv.port, hello=False)
        self.addCleanup(long.close)
        long.send('/resume %s\nhello from a newcomer\n' % ('x' * 5000))
        long.expect(r'^!!! line too long')
        bob.expect(r'^<guest-\d+> hello from a newcomer$')

    def test_a_kick_ends_the_session(self):
        ann, token = self.session('ann')
        op = self.connect('op')
        op.send('/op op\n/kick ann enough\n')
        op.expect(r'^-!- ann left \(kicked by op: enough\)$')
        back = self.resume(token)
        back.expect(r'^!!! cannot resume')

    def test_lines_from_someone_ignored_then_are_not_counted(self):
        ann, token = self.session('ann')
        bob = self.connect('bob')
        ann.send('/ignore bob\n')
        ann.expect(r'^-!- You ignore bob: ')
        bob.send('one\ntwo\n/quit\n')  # its quit ends the ignore
        ann.expect(r'^-!- bob left \(quit\)$')
        cut(ann)
        back = self.resume(token, len(self.since_token(ann)))  # to bob's leaving
        back.expect(r'^-!- You are back as ann in #lobby: 0 lines you missed$')

    def test_a_line_said_in_the_turn_of_the_resume_comes_once(self):
        # Stepped, so that a line and a /resume land in one loop turn; the
        # loop rotates its order each turn, so over a few tries the line
        # is handled both before and after the resume.
        server, address = stepped_server(self, rate=0)
        said, ann = socket.create_connection(address), socket.create_connection(address)
        for sock in (said, ann):
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
        step_until(server, lambda: len(server.names) == 2, 'both in')
        owner = [peer for peer in server.names.values()
                 if peer.sock.getpeername() == ann.getsockname()][0]
        for attempt in range(4):
            token = owner.session.token
            ann.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            ann.close()
            step_until(server, lambda: owner.lost_at is not None, 'the loss')
            ann = socket.create_connection(address)
            self.addCleanup(ann.close)
            step_until(server, lambda: len(server.peers) == 2, 'accepted')
            said.sendall(b'line %d\n' % attempt)
            ann.sendall(('/resume %s\n' % token).encode())
            ends = [peer.sock for peer in server.peers]  # the server's side of both
            wait_until(lambda: len(select.select(ends, [], [], 0)[0]) == 2,
                       'both lines waiting for the next turn')
            step_until(server, lambda: owner.lost_at is None and not owner.outbuf, 'the resume')
            ann.settimeout(TIMEOUT)
            received = b''
            while b'line %d\n' % attempt not in received:
                received += ann.recv(65536)
            ann.setblocking(False)
            received += recv_now(ann)  # all of it was sent: loopback has it now
            self.assertEqual(received.count(b'line %d' % attempt), 1, received)


class TestSessionsRace(unittest.TestCase):

    def test_a_quit_and_a_resume_in_one_turn(self):
        # Stepped, so that both land in one loop turn, in both orders over
        # a few tries (the loop rotates its order): the server goes on, and
        # the session either resumes or has ended.
        server, address = stepped_server(self, rate=0)
        for attempt in range(4):
            leaving = socket.create_connection(address)
            self.addCleanup(leaving.close)
            leaving.sendall(b'\n')
            step_until(server, lambda: any(p.sock and p.sock.getpeername() == leaving.getsockname()
                                           and p.session for p in server.names.values()), 'in')
            owner = [p for p in server.names.values()
                     if p.sock and p.sock.getpeername() == leaving.getsockname()][0]
            back = socket.create_connection(address)
            self.addCleanup(back.close)
            step_until(server, lambda: len(server.peers) == 2, 'accepted')
            leaving.sendall(b'/quit\n')
            back.sendall(('/resume %s\n' % owner.session.token).encode())
            ends = [peer.sock for peer in server.peers]
            wait_until(lambda: len(select.select(ends, [], [], 0)[0]) == 2, 'both lines waiting')
            for _ in range(3):
                server.run_once(timeout=0.1)  # raises if the loop breaks
            self.assertEqual(len(server.names), 1, self.logs)  # one of them, not both or none
            for peer in list(server.names.values()):
                server.drop(peer, 'quit')
            server.run_once(timeout=0.1)


class TestSessionsExpire(ServerTestCase):
    SERVER_OPTIONS = {'resume_for': 0.3}

    def test_the_name_is_free_once_the_wait_is_over(self):
        ann = self.connect('ann')
        bob = self.connect('bob')
        cut(ann)
        bob.expect(r'^-!- ann lost the connection$')
        bob.expect(r'^-!- ann left \(connection lost\)$')
        bob.send('/nick ann\n')
        bob.expect(r'^-!- bob is now known as ann$')

    def test_the_token_ends_with_the_wait(self):
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        token = conn.expect(RESUME_LINE)[1].group(1)
        bob = self.connect('bob')
        cut(conn)
        bob.expect(r'^-!- guest-\d+ left \(connection lost\)$')
        again = Conn(self.srv.port, hello=False)
        self.addCleanup(again.close)
        again.send('/resume %s\n' % token)
        again.expect(r'^!!! cannot resume: no such session')


# --- The page in a real browser ------------------------------------------------

PAGE_WAIT_JS = "window.chat && chat.state()"
LOG_TEXTS_JS = "Array.from(document.querySelectorAll('#log li .text'), node => node.textContent)"
HIDE_TAB_JS = ("Object.defineProperty(document, 'visibilityState', "
               "{configurable: true, get: () => 'hidden'});"
               "document.dispatchEvent(new Event('visibilitychange'))")
SHOW_TAB_JS = ("delete document.visibilityState;"
               "document.dispatchEvent(new Event('visibilitychange'))")
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PHONE = {'width': 375, 'height': 667, 'deviceScaleFactor': 2, 'mobile': True}


class OtherSite:
    """Some other web site on loopback: an empty page, no CSP."""

    def __init__(self):
        handler = type('Handler', (http.server.BaseHTTPRequestHandler,), {
            'do_GET': OtherSite.serve, 'log_message': lambda *args: None})
        self.httpd = http.server.HTTPServer(('127.0.0.1', 0), handler)
        self.origin = 'http://127.0.0.1:%d' % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def serve(handler):
        body = b'<!doctype html><title>elsewhere</title>'
        handler.send_response(200)
        handler.send_header('Content-Type', 'text/html')
        handler.send_header('Content-Length', str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


class PageTests:
    """The page, in a headless Chromium, against a real server: what a
    person in a browser does, and what nc users on the same room see."""

    def open_page(self, port, name=None):
        """A browser on the page at port; joined as name if given."""
        browser = Browser()
        self.addCleanup(browser.close)
        # Kept after the run (each run overwrites them), for a failure to be looked at.
        self.shots = os.path.join(tempfile.gettempdir(), 'chat.py-test-screenshots')
        os.makedirs(self.shots, exist_ok=True)
        browser.goto('http://127.0.0.1:%d/' % port)
        browser.wait_for(PAGE_WAIT_JS, 'the page to start')
        if name:
            browser.wait_for("!document.getElementById('name-form').hidden", 'the name form')
            browser.evaluate("document.getElementById('name-input').focus()")
            browser.insert_text(name)
            browser.press('Enter')
            self.wait_state(browser, "s.name === %s" % json.dumps(name), 'named ' + name)
        return browser

    def wait_state(self, browser, condition, what='the page state'):
        return browser.wait_for('(s => %s)(chat.state())' % condition, what)

    def type_line(self, browser, text):
        browser.evaluate("document.getElementById('line').focus()")
        browser.insert_text(text)
        browser.press('Enter')

    def wait_text(self, browser, text):
        """The log's lines once one of them is text."""
        return browser.wait_for("(t => t.includes(%s) && t)(%s)" % (json.dumps(text), LOG_TEXTS_JS),
                                'a line %r on the page' % text)

    def screenshot(self, browser, name):
        """Kept in the test's folder, for whoever looks into a failure."""
        path = os.path.join(self.shots, name)
        browser.screenshot(path)
        with open(path, 'rb') as png:
            self.assertEqual(png.read(8), PNG_SIGNATURE)


class TestPage(PageTests, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'max_line': 300}

    def test_a_korean_name_chats_with_nc_and_markup_stays_text(self):
        nc = self.connect('nc')
        browser = self.open_page(self.srv.port, '민수')
        nc.expect(came('민수'))
        self.type_line(browser, '안녕하세요 👋')
        nc.expect(r'^<민수> 안녕하세요 👋$')
        nc.send('반가워요, 민수\n')
        self.wait_text(browser, '반가워요, 민수')
        # The same colour as the terminal client gives the name.
        colour = browser.evaluate("document.querySelector('#log li.public:last-child .who').className")
        self.assertIn('n' + chat.TerminalScreen.name_colour(None, 'nc'), colour.split())
        # Markup from the network is shown as its characters, never parsed.
        payload = '<img src=x onerror=alert(1)><script>alert(2)</script>'
        nc.send(payload + '\n')
        self.wait_text(browser, payload)
        self.assertEqual(browser.evaluate("document.querySelectorAll('#log img, #log script').length"), 0)
        nc.send('/topic <b>bold</b>\n')
        browser.wait_for("document.getElementById('topic').textContent === '<b>bold</b>'", 'topic')
        self.assertEqual(browser.evaluate("document.querySelectorAll('#topic b').length"), 0)
        self.assertEqual(browser.console_messages, [])
        self.assertEqual(self.wait_state(browser, "s.members.includes('nc') && s.members"),
                         ['nc', '민수'])
        self.screenshot(browser, 'korean.png')

    def test_commands_recall_and_the_line_limit(self):
        nc = self.connect('nc')
        browser = self.open_page(self.srv.port, 'web')
        nc.expect(came('web'))
        self.type_line(browser, '/join dev')
        self.wait_state(browser, "s.room === '#dev'")
        browser.wait_for("document.getElementById('room').textContent === '#dev'", 'header')
        nc.expect(r'^-!- web left for #dev$')
        self.type_line(browser, '/me waves')
        self.type_line(browser, '/part')
        self.wait_state(browser, "s.room === '#lobby'")
        nc.expect(r'^-!- web joined$')
        self.type_line(browser, 'first')
        nc.expect(r'^<web> first$')
        # Up recalls the last line sent, then the one before; Down returns to the draft.
        browser.insert_text('draft')
        browser.press('ArrowUp')
        self.assertEqual(browser.evaluate("document.getElementById('line').value"), 'first')
        browser.press('ArrowUp')
        self.assertEqual(browser.evaluate("document.getElementById('line').value"), '/part')
        browser.press('ArrowDown')
        browser.press('ArrowDown')
        self.assertEqual(browser.evaluate("document.getElementById('line').value"), 'draft')
        # Over the server's --max-line (300 here, told to the page): refused, kept.
        browser.evaluate("document.getElementById('line').value = ''")
        long_line = '가' * 101  # 303 bytes
        self.type_line(browser, long_line)
        self.wait_text(browser, 'line too long (303 bytes; at most 300): not sent')
        self.assertEqual(browser.evaluate("document.getElementById('line').value"), long_line)
        self.type_line(browser, '')  # nothing: a blank line is not sent
        browser.evaluate("document.getElementById('line').value = ''")
        self.type_line(browser, 'after')
        self.assertEqual(nc.expect(r'^<web> .*')[1].group(0), '<web> after')

    def test_an_ime_composition_is_not_sent_half_done(self):
        nc = self.connect('nc')
        browser = self.open_page(self.srv.port, 'ime')
        nc.expect(came('ime'))
        browser.evaluate("document.getElementById('line').focus()")
        browser.compose('하')  # half of 한
        browser.press('Enter')
        browser.commit_composition('한')
        browser.insert_text('글')
        browser.press('Enter')
        self.assertEqual(nc.expect(r'^<ime> .*')[1].group(0), '<ime> 한글')

    def test_mentions_and_the_unread_count(self):
        nc = self.connect('nc')
        browser = self.open_page(self.srv.port, 'alice')
        nc.expect(came('alice'))
        browser.evaluate(HIDE_TAB_JS)
        nc.send('hello alice\n')
        nc.send('malice is no mention\n')
        self.wait_text(browser, 'malice is no mention')
        marks = browser.evaluate("Array.from(document.querySelectorAll('#log li.mention mark'),"
                                 " m => m.textContent)")
        self.assertEqual(marks, ['alice'])
        self.assertEqual(browser.evaluate('document.title'), '(2) #lobby — chat')
        browser.evaluate(SHOW_TAB_JS)
        self.assertEqual(browser.evaluate('document.title'), '#lobby — chat')

    def test_a_page_of_another_origin_cannot_open_the_socket(self):
        # Another site's page, served from another port (another origin),
        # with no CSP of ours: only the server's Origin check stops it.
        elsewhere = OtherSite()
        self.addCleanup(elsewhere.stop)
        allowed = ServerThread(web_origins=[elsewhere.origin])
        self.addCleanup(allowed.stop)
        browser = Browser()
        self.addCleanup(browser.close)
        browser.goto(elsewhere.origin + '/')
        opening = """new Promise(done => {
            const ws = new WebSocket('ws://127.0.0.1:%d/ws');
            ws.onopen = () => { done('open'); ws.close(); };
            ws.onclose = event => done('closed ' + event.code);
        })"""
        self.assertEqual(browser.evaluate(opening % self.srv.port), 'closed 1006')
        self.srv.wait_log(r'HTTP: 403')
        self.assertEqual(browser.evaluate(opening % allowed.port), 'open')  # --web-origin

    def test_a_dropped_page_resumes_with_the_missed_lines_once(self):
        proxy = CuttableProxy(self.srv.port)  # the page's Wi-Fi
        self.addCleanup(proxy.stop)
        nc = self.connect('nc')
        browser = self.open_page(proxy.port, 'pia')
        nc.expect(came('pia'))
        browser.evaluate('window.CHAT_BACKOFF_MS = [300, 300]')
        nc.send('before the drop\n')
        self.wait_text(browser, 'before the drop')
        proxy.cut()
        nc.expect(r'^-!- pia lost the connection$')
        nc.send('while pia was away\n')
        nc.expect(r'^-!- pia is back$')
        texts = self.wait_text(browser, 'while pia was away')
        self.assertEqual((texts.count('before the drop'), texts.count('while pia was away')),
                         (1, 1))
        self.wait_state(browser, "s.connected && s.name === 'pia'", 'back as pia')
        self.srv.wait_log(r'pia resumed from ')

    def test_phone_layout_and_labels(self):
        browser = self.open_page(self.srv.port)
        browser.send('Emulation.setDeviceMetricsOverride', PHONE)
        browser.wait_for("document.activeElement.id === 'name-input'", 'the name asked')
        browser.insert_text('phone')
        browser.press('Enter')
        self.wait_state(browser, "s.name === 'phone'")
        geometry = browser.evaluate("""(() => {
            const box = id => document.getElementById(id).getBoundingClientRect();
            const small = Array.from(document.querySelectorAll('button, input, summary'))
                .filter(e => e.offsetParent && e.getBoundingClientRect().height < 44);
            return {height: innerHeight, form: box('send-form').bottom,
                    page: document.documentElement.scrollHeight, small: small.length,
                    unlabelled: Array.from(document.querySelectorAll('input'))
                        .filter(input => !input.labels.length).length,
                    live: document.getElementById('log').getAttribute('aria-live')};
        })()""")
        self.assertEqual(geometry['form'], geometry['height'])  # the input at the bottom
        self.assertEqual(geometry['page'], geometry['height'])  # only the log scrolls
        self.assertEqual((geometry['small'], geometry['unlabelled'], geometry['live']),
                         (0, 0, 'polite'))
        browser.send('Emulation.setEmulatedMedia', {
            'features': [{'name': 'prefers-color-scheme', 'value': 'dark'}]})
        self.assertEqual(browser.evaluate("getComputedStyle(document.body).backgroundColor"),
                         'rgb(22, 24, 29)')
        self.screenshot(browser, 'phone-dark.png')


class TestPageReconnects(PageTests, unittest.TestCase):

    def remy_in_dev(self, server):
        """A page that joined as remy and went to #dev; it reconnects fast."""
        browser = self.open_page(server.port, 'remy')
        browser.evaluate('window.CHAT_BACKOFF_MS = [100, 200]')
        self.type_line(browser, '/join dev')
        self.wait_state(browser, "s.room === '#dev'", 'in #dev')
        return browser

    def test_after_a_server_restart_with_its_name_room_and_draft(self):
        server = ServerProcess()
        self.addCleanup(lambda: server.stop())
        port = server.port
        browser = self.remy_in_dev(server)
        server.stop()
        self.wait_state(browser, "s.reconnecting && !s.connected", 'reconnecting')
        browser.wait_for("document.getElementById('banner-text').textContent"
                         ".startsWith('reconnecting…')", 'the banner')
        self.screenshot(browser, 'reconnecting.png')
        browser.evaluate("document.getElementById('line').focus()")
        browser.insert_text('half a thought')
        server = ServerProcess(port=port)
        self.wait_state(browser, "s.connected && s.name === 'remy' && s.room === '#dev'",
                        'back as remy in #dev')
        self.assertEqual(browser.evaluate("document.getElementById('line').value"),
                         'half a thought')
        self.assertTrue(browser.evaluate("document.getElementById('banner').hidden"))
        nc = Conn(port)
        self.addCleanup(nc.close)
        nc.send('/join dev\n')  # (the page may say it is back before the server has it so)
        nc.expect(here_or_came('#dev', 'remy'))
        browser.press('Enter')
        nc.expect(r'^<remy> half a thought$')

    def test_with_data_it_resumes_its_session_across_a_kill_9(self):
        data = tempfile.mkdtemp(prefix='chat-data-')
        self.addCleanup(shutil.rmtree, data)
        server = ServerProcess('--data', data)
        self.addCleanup(lambda: server.stop())
        port = server.port
        browser = self.remy_in_dev(server)
        server.finish(signal.SIGKILL)
        self.wait_state(browser, "s.reconnecting && !s.connected", 'reconnecting')
        server = ServerProcess('--data', data, port=port)
        server.wait_log(r'remy resumed from ')  # its session waited through the restart
        self.wait_state(browser, "s.connected && s.name === 'remy' && s.room === '#dev'",
                        'back as remy in #dev')
        browser.wait_for("document.getElementById('log').textContent.includes("
                         "'You are back as remy in #dev')", 'the resume notice')

    def test_no_reconnect_after_quit(self):
        server = ServerProcess()
        self.addCleanup(server.stop)
        browser = self.open_page(server.port, 'quitter')
        browser.evaluate('window.CHAT_BACKOFF_MS = [100, 200]')
        self.type_line(browser, '/quit')
        self.wait_state(browser, "!s.connected && s.stopped", 'stopped')
        browser.wait_for("document.getElementById('banner-text').textContent"
                         ".startsWith('Disconnected')", 'the banner')
        server.wait_log(r'quitter left')
        self.assertFalse(browser.evaluate('chat.state().reconnecting'))


# --- Durable history: --data ----------------------------------------------------

REPLAYED_LINE = r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] '


def history_of(conn, count=chat.HISTORY_MAX_LINES):
    """The lines /history gives conn, without their stamps."""
    conn.send('/history %d\n' % count)
    _, heading = conn.expect(r'^-!- (Last (\d+) messages?|No history)')
    if heading.group(1).startswith('No'):
        return []
    lines = [conn.line() for _ in range(int(heading.group(2)))]
    for line in lines:
        assert re.match(REPLAYED_LINE, line), line
    return [line.split('] ', 1)[1] for line in lines]


def records(*lines, stamp=b'2020-01-02T03:04:05Z', room='#lobby'):
    """The data log's records for lines, as chat.py writes them."""
    return b''.join(chat.data_record(stamp, room, line.encode()) for line in lines)


def in_order(seen, kept):
    """True if every line of seen is in kept, in the same order."""
    position = iter(kept)
    return all(line in position for line in seen)


def rooms_said_in(numbers):
    """Input that joins #rN and says "said in rN" there, for each N: rooms
    enough to pass the bounds on those kept with no one in them."""
    return ''.join('/join #r%d\nsaid in r%d\n' % (number, number) for number in numbers)


class DataTests:
    """A server with --data DIR: what it keeps, and what it survives."""

    def setUp(self):
        self.data = tempfile.mkdtemp(prefix='chat-data-')
        self.addCleanup(shutil.rmtree, self.data)
        self.log_path = os.path.join(self.data, chat.DATA_LOG_NAME)

    def serve(self, *args, **kw):
        server = ServerProcess('--data', self.data, '--rate', '0', *args, **kw)
        self.addCleanup(server.stop)
        return server

    def join(self, server, name):
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- \d+ online')
        conn.send('/nick %s\n' % name)
        conn.expect(r'is now known as %s$' % name)
        conn.name = name
        return conn


class TestData(DataTests, unittest.TestCase):

    def test_rooms_no_one_is_in_are_kept_up_to_a_bound(self):
        kept = chat.KEPT_ROOMS_MAX
        server = self.serve()
        ann = self.join(server, 'ann')
        ann.send(rooms_said_in(range(kept + 2))
                 + '/join #lobby\n')  # as ann leaves the last, two rooms are too many
        for conn in (ann, None):
            if conn is None:  # the log still has r0 and r1: loaded, and too many
                server.stop()
                server = self.serve(port=server.port)
                conn = self.join(server, 'ben')
            conn.send('/rooms\n/join #r1\n/join #r2\n/join #lobby\n')
            conn.expect(r'^-!- %d rooms,' % (kept + 1))  # r2 to r1001, and the lobby
            before, _ = conn.expect(r'\] <ann> said in r2$')  # replayed, stamped
            self.assertNotIn('<ann> said in r1', before)  # the one said in longest ago went

    def test_the_oldest_room_kept_may_be_joined_as_the_last_one_left_empties(self):
        server = self.serve()
        ann, ben = self.join(server, 'ann'), self.join(server, 'ben')
        ann.send(rooms_said_in(range(chat.KEPT_ROOMS_MAX + 1)) + '/join #r0\n')
        ann.expect(r'\] <ann> said in r0$')  # r1000 is empty now, and r0 is not
        ben.send('/join #r0\n')
        ben.expect(r'^-!- 2 online in #r0: ann, ben$')

    def test_kill_9_loses_no_line_that_anyone_saw(self):
        server = self.serve()
        people = [self.join(server, name) for name in ('ann', 'ben', 'cat')]
        for conn in people:
            roundtrip(conn)
        heard = {conn.name: [] for conn in people}
        for number in range(60):
            speaker = people[number % 3]
            try:
                speaker.send('%s says %d\n' % (speaker.name, number))
            except OSError:  # a reset: the server is gone, which only the kill does
                self.assertGreater(number, 45)
            if number == 30:  # ben has heard something: kill the server mid-talk
                heard['ben'].append(people[1].expect(r'^<ann> ann says 0$')[1].string)
            if number == 45:
                os.kill(server.proc.pid, signal.SIGKILL)
        for conn in people:  # what each received before the server died
            try:
                while True:
                    line = conn.line()
                    if line.startswith('<'):
                        heard[conn.name].append(line)
            except (ConnectionError, AssertionError, OSError):
                pass
        server.proc.wait(TIMEOUT)
        again = self.serve()
        kept = history_of(self.join(again, 'dan'))
        self.assertEqual(len(kept), len(set(kept)))  # nothing twice
        for name, lines in heard.items():
            self.assertTrue(in_order(lines, kept), (name, lines, kept))
        again.wait_log(r'data: \d+ records of 1 room from ')

    def test_every_line_is_written_before_anyone_receives_it(self):
        for fsync in chat.FSYNC_CHOICES:
            server = self.serve('--fsync', fsync, '--resume-for', '0')  # names free again
            ann, ben = self.join(server, 'ann'), self.join(server, 'ben')
            for number in range(20):
                ann.send('line %d with %s\n' % (number, fsync))
                ben.expect(r'^<ann> line %d with' % number)
                with open(self.log_path, 'rb') as log:
                    self.assertIn(b'\t<ann> line %d with %s\t' % (number, fsync.encode()),
                                  log.read())
            server.stop()

    def test_a_turns_records_are_written_before_its_lines_are_sent(self):
        data = chat.DataLog(self.data, fsync='no')
        server, address = stepped_server(self, rate=0, data=data)
        ann, ben = socket.create_connection(address), socket.create_connection(address)
        for sock in (ann, ben):
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
        step_until(server, lambda: len(server.names) == 2, 'both in')

        def ben_has_it():
            try:
                return b'written first' in ben.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
        had_it_before_the_write = []
        real_write = data.write

        def write_and_look(srv):
            if b'written first' in data.pending:
                had_it_before_the_write.append(ben_has_it())
            real_write(srv)
        data.write = write_and_look
        ann.sendall(b'written first\n')
        step_until(server, ben_has_it, 'the line sent')
        self.assertEqual(had_it_before_the_write, [False])
        self.assertRegex(file_bytes(self.log_path), rb'\t<guest-\d> written first\t')

    def test_topics_and_rooms_come_back_after_a_restart(self):
        server = self.serve()
        ann = self.join(server, 'ann')
        ann.send('/join dev\n/topic fixing the build\nis it green?\n/me looks\n')
        ann.expect(r'^-!- ann set the topic: fixing the build$')
        roundtrip(ann)
        server.finish()
        again = self.serve('--resume-for', '0')  # no session waits in #dev: it is empty
        ben = self.join(again, 'ben')
        ben.send('/rooms\n')
        ben.expect(r'^-!-   #dev \(0\): fixing the build$')
        ben.send('/join dev\n')
        ben.expect(r'^-!- Topic of #dev: fixing the build$')
        ben.expect(r'^-!- Last 2 messages:$')
        self.assertRegex(ben.line(), REPLAYED_LINE + r'<ann> is it green\?$')
        self.assertRegex(ben.line(), REPLAYED_LINE + r'\* ann looks$')

    def test_a_torn_last_record_and_a_damaged_one_are_skipped(self):
        good = records('<old> first', '<old> second', '<old> third')
        damaged = good.replace(b'second', b'secXnd')  # its checksum no longer matches
        with open(self.log_path, 'wb') as log:
            log.write(damaged + records('<old> torn by a power cut')[:-9])
        server = self.serve()
        server.wait_log(r'data: 2 records of 1 room from .*, 1 damaged record skipped, '
                        r'a torn last record cut off')
        ann = self.join(server, 'ann')
        self.assertEqual(history_of(ann), ['<old> first', '<old> third'])
        ann.send('/msg ann sync\nnew after the tear\n')
        ann.expect(r'^\[PM from ann\] sync$')
        roundtrip(ann)
        server.finish()
        again = self.serve()
        # The append started on a line of its own; the damaged record stays skipped.
        again.wait_log(r'data: 3 records of 1 room from \S+, 1 damaged record skipped$')
        self.assertEqual(history_of(self.join(again, 'ben'))[-1], '<ann> new after the tear')

    def test_the_lock_goes_with_the_close(self):
        chat.DataLog(self.data, fsync='no').close()
        chat.DataLog(self.data, fsync='no').close()  # not "in use by another server"

    def test_a_second_server_on_the_same_folder_refuses(self):
        self.serve()
        result = run_chat('server', '0', '--host', '127.0.0.1', '--data', self.data)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, 'chat.py: error: %s is in use by another chat.py '
                         'server (its lock is held)\n' % self.data)

    def test_the_log_is_compacted_past_data_max(self):
        server = self.serve('--data-max', '4K', '--history', '5')
        ann = self.join(server, 'ann')
        for number in range(200):
            ann.send('line %03d %s\n' % (number, 'x' * 40))
        roundtrip(ann)
        server.wait_log(r'data: compacted ')
        self.assertLess(os.path.getsize(self.log_path), 8 * 1024)
        server.finish()
        again = self.serve('--history', '5')
        ben = Conn(again.port)
        self.addCleanup(ben.close)
        ben.expect(r'^-!- Last 5 messages:$')
        self.assertRegex(ben.line(), REPLAYED_LINE + '<ann> line 195 ')

    def test_compaction_keeps_every_line_of_a_quiet_room(self):
        server = self.serve('--data-max', '4K', '--history', '5')
        cy = self.join(server, 'cy')
        cy.send('/join quiet\n/topic hush\nq one\nq two\nq three\n')
        roundtrip(cy)
        ann = self.join(server, 'ann')
        for number in range(200):  # the lobby's lines make the log compact itself
            ann.send('line %03d %s\n' % (number, 'x' * 40))
        roundtrip(ann)
        server.wait_log(r'data: compacted ')
        server.finish()
        again = self.serve('--history', '5', '--resume-for', '0')
        ben = self.join(again, 'ben')
        ben.send('/join quiet\n')
        ben.expect(r'^-!- Topic of #quiet: hush$')
        self.assertEqual(history_of(ben), ['<cy> q one', '<cy> q two', '<cy> q three'])

    def test_private_messages_never_reach_the_log(self):
        server = self.serve()
        ann, ben = self.join(server, 'ann'), self.join(server, 'ben')
        ann.send('/msg ben a secret\n/me waves in public\n')
        ben.expect(r'^\* ann waves in public$')
        roundtrip(ann)
        saved = file_bytes(self.log_path)
        self.assertIn(b'\t* ann waves in public\t', saved)
        self.assertNotIn(b'a secret', saved)
        self.assertNotIn(b'PM', saved)

    def test_a_wrong_fsync_is_refused(self):
        result = run_chat('server', '--data', self.data, '--fsync', 'sometimes')
        self.assertEqual(result.returncode, 2)
        self.assertIn("--fsync: invalid choice: 'sometimes'", result.stderr)


# A server whose --data folder is a small file system of its own: a tmpfs
# mounted in a mount namespace made for it (unshare -m, as root), so that
# the test can fill it or make it read-only.  The test reaches it through
# /proc/PID/root, and changes it with nsenter.
TMPFS_RUN = 'mount -t tmpfs -o size=%s tmpfs "$DATA" && %s exec "$@"'


class TestDataFaults(DataTests, unittest.TestCase):

    def serve_on_tmpfs(self, size, then=''):
        if os.geteuid() != 0 or shutil.which('unshare') is None:
            self.skipTest('needs root and unshare(1) for a mount namespace')
        os.environ['DATA'] = self.data
        self.addCleanup(os.environ.pop, 'DATA')
        server = self.serve(python=('unshare', '-m', 'sh', '-c', TMPFS_RUN % (size, then),
                                    'sh', sys.executable))
        self.server_pid = server.proc.pid
        self.inside = '/proc/%d/root%s' % (server.proc.pid, self.data)
        return server

    def saved(self):
        """The lines in the server's log, read through its mount namespace."""
        with open(os.path.join(self.inside, chat.DATA_LOG_NAME), 'rb') as log:
            whole = log.read().split(b'\n')[:-1]  # not a record being written now
        return [(chat.parse_record(raw) or (0, 0, b'DAMAGED'))[2].decode() for raw in whole]

    def test_a_full_disk_keeps_the_room_talking_and_loses_nothing(self):
        server = self.serve_on_tmpfs('64k', 'head -c 50000 /dev/zero > "$DATA/filler" &&')
        ann, ben = self.join(server, 'ann'), self.join(server, 'ben')
        said = []
        for number in range(400):
            said.append('<ann> line %03d %s' % (number, 'x' * 40))
            ann.send(said[-1][6:] + '\n')
            ben.expect('^' + re.escape(said[-1]) + '$')  # the room goes on
            if any('No space left' in line for line in server.logs):
                break
        server.wait_log(r'data: cannot write \S+: No space left on device; history is kept '
                        r'in memory')
        self.assertEqual(sum('cannot write' in line for line in server.logs), 1)  # once
        for number in range(400, 405):
            said.append('<ann> line %03d' % number)
            ann.send(said[-1][6:] + '\n')
            ben.expect('^' + re.escape(said[-1]) + '$')
        os.remove(os.path.join(self.inside, 'filler'))
        said.append('<ann> there is room again')
        ann.send('there is room again\n')
        ben.expect(r'^<ann> there is room again$')
        wait_until(lambda: self.saved() == said, 'every line written')  # retried each second
        server.wait_log(r'data: writing \S+ again$')

    def test_a_read_only_folder_keeps_the_room_talking_until_it_is_writable(self):
        server = self.serve_on_tmpfs('1m', 'mount -o remount,ro "$DATA" &&')
        server.wait_log(r'data: cannot write \S+: Read-only file system')
        ann, ben = self.join(server, 'ann'), self.join(server, 'ben')
        ann.send('said while read-only\n')
        ben.expect(r'^<ann> said while read-only$')
        self.remount('rw')
        ann.send('and after\n')
        ben.expect(r'^<ann> and after$')
        wait_until(lambda: os.path.exists(os.path.join(self.inside, chat.DATA_LOG_NAME))
                   and self.saved() == ['<ann> said while read-only', '<ann> and after'],
                   'both lines written')

    def test_a_name_registered_while_read_only_is_written_on_a_quiet_server(self):
        server = self.serve_on_tmpfs('1m', 'mount -o remount,ro "$DATA" &&')
        server.wait_log(r'data: cannot write \S+: Read-only file system')
        ann = self.join(server, 'ann')
        ann.send('/register ann-secret\n')
        ann.expect(r'^-!- The name ann is yours')  # kept in memory meanwhile
        self.remount('rw')  # and then nothing happens: a timer must bring the retry
        people = os.path.join(self.inside, chat.PEOPLE_LOG_NAME)
        wait_until(lambda: os.path.exists(people) and b'\tname\tann\t' in file_bytes(people),
                   'the registered name written')
        server.wait_log(r'data: writing \S+people\.log again$')

    def remount(self, mode):
        """Make the server's data folder writable (rw) or not (ro)."""
        subprocess.run(['nsenter', '-t', str(self.server_pid), '-m', 'mount', '-o',
                        'remount,' + mode, self.data], check=True, timeout=TIMEOUT)


def file_bytes(path):
    with open(path, 'rb') as handle:
        return handle.read()


def people_records(folder):
    """The records of DIR/people.log: (kind, fields)."""
    with open(os.path.join(folder, chat.PEOPLE_LOG_NAME), 'rb') as saved:
        parsed = [chat.parse_people_record(raw) for raw in saved.read().split(b'\n')[:-1]]
    assert None not in parsed, parsed
    return [(kind, fields) for _, kind, fields in parsed]


class TestNames(DataTests, unittest.TestCase):
    """/register, /nick NAME PASSWORD, /unregister, /drop, and messages that
    wait for a registered name (--data)."""

    def register(self, server, name, password):
        conn = self.join(server, name)
        conn.send('/register %s\n' % password)
        conn.expect(r'^-!- The name %s is yours: from now on it needs the password' % name)
        return conn

    def test_a_registered_name_needs_its_password_even_after_a_restart(self):
        server = self.serve('--resume-for', '0')
        ann = self.register(server, 'ann', 'correct horse')
        ann.send('/quit\n')
        ann.expect_closed()
        server.finish()
        kinds = people_records(self.data)
        self.assertEqual([kind for kind, _ in kinds], ['name'])
        self.assertNotIn(b'correct horse', file_bytes(os.path.join(
            self.data, chat.PEOPLE_LOG_NAME)))  # a salted hash, never it
        self.assertRegex(kinds[0][1][1], r'^(scrypt:16384:8:1|pbkdf2-sha256:600000)\$')
        self.assertEqual(os.stat(os.path.join(self.data, chat.PEOPLE_LOG_NAME)).st_mode
                         & 0o777, 0o600)
        again = self.serve('--resume-for', '0')
        again.wait_log(r'data: 1 registered name, 0 waiting messages and 0 open sessions')
        other = self.join(again, 'other')
        other.send('/nick ann\n')
        other.expect(r'^!!! cannot use the name ann: it is registered; give its password: '
                     r'/nick ann PASSWORD$')
        other.send('/nick ann wrong one\n')
        other.expect(r'^!!! wrong password for the name ann \(2 tries left\)$')
        other.send('/nick ANN correct horse\n')  # the name's key, as any name's
        other.expect(r'^-!- other is now known as ANN$')
        other.send('/nick ann\n')  # a registered name's owner may change its case
        other.expect(r'^-!- ANN is now known as ann$')

    def test_three_wrong_passwords_close_the_connection(self):
        server = self.serve()
        ann = self.register(server, 'ann', 'correct horse')
        ann.send('/quit\n')
        ann.expect_closed()
        guesser = self.join(server, 'guesser')
        for left in (2, 1):
            guesser.send('/nick ann guess%d\n' % left)
            guesser.expect(r'^!!! wrong password for the name ann \(%d tries? left\)$' % left)
        guesser.send('/nick ann guess0\n')
        self.assertIn('!!! wrong password for the name ann: goodbye', guesser.expect_closed())

    def test_the_owner_takes_its_name_back_from_its_lost_connection(self):
        server = self.serve()
        ann = self.register(server, 'ann', 'correct horse')
        ben = self.join(server, 'ben')
        cut(ann)
        ben.expect(r'^-!- ann lost the connection$')
        ben.send('while ann is cut off\n')
        roundtrip(ben)
        back = self.join(server, 'guest')
        back.send('/nick ann correct horse\n')  # its token is gone with its client
        back.expect(r'^-!- You are back as ann in #lobby: \d+ lines? you missed')
        missed = back.expect(RESUME_LINE)[0]
        self.assertEqual(missed.count('<ben> while ann is cut off'), 1, missed)
        ben.expect(r'^-!- ann is back$')

    def test_unregister_and_drop_let_the_name_go(self):
        server = self.serve(env=dict(os.environ, CHAT_OP_PASSWORD='op-secret'))
        ann = self.register(server, 'ann', 'correct horse')
        ann.send('/unregister\n')
        ann.expect(r'^-!- ann is no longer registered$')
        ann.send('/register horse battery\n')
        ann.expect(r'^-!- The name ann is yours')
        ann.send('/nick ann2\n')
        ann.expect(r'^-!- ann is now known as ann2$')
        op = self.join(server, 'op')
        op.send('/drop ann\n')
        op.expect(r'^!!! /drop is for operators')
        op.send('/op op-secret\n/drop ann\n')
        op.expect(r'^-!- ann is no longer registered$')
        op.send('/nick ann\n')
        op.expect(r'^-!- op is now known as ann$')
        server.wait_log(r'ann is no longer registered \(by op\)')
        self.assertEqual([kind for kind, _ in people_records(self.data)
                          if kind in ('name', 'unname')], ['name', 'unname', 'name', 'unname'])

    def test_what_register_refuses(self):
        server = self.serve()
        guest = Conn(server.port)
        self.addCleanup(guest.close)
        guest.send('/register longenough\n')
        guest.expect(r'^!!! choose a name first \(/nick NAME\), then register it$')
        guest.send('/nick ann\n/register short\n')
        guest.expect(r'^!!! the password must have at least 6 characters$')
        guest.send('/register\n')
        guest.expect(r'^!!! usage: /register PASSWORD$')
        guest.send('/nick bob secret99\n')  # not registered: the name, and a word
        guest.expect(r'^-!- bob is not registered: the password was not used')

    def test_a_message_to_a_registered_name_waits_for_it_across_a_restart(self):
        with open(os.path.join(self.data, chat.PEOPLE_LOG_NAME), 'wb') as saved:
            saved.write(chat.tab_record([chat.utc_stamp(time.time()), b'name', b'ann',
                                         chat.hash_password('correct horse').encode()]))
            saved.write(chat.tab_record([chat.utc_stamp(time.time() - 8 * 86400), b'mail',
                                         b'ann', b'old', b'from last month']))  # too old
        server = self.serve()
        bob = self.join(server, 'bob')
        bob.send('/msg ann are you coming tonight?\n')
        bob.expect(r'^\[PM to ann\] are you coming tonight\?$')
        bob.expect(r'^-!- ann is not here: the message waits for them \(up to 7 days\)$')
        bob.send('/msg nobody hello\n')
        bob.expect(r'^!!! no one called nobody is online$')  # not registered: not kept
        for number in range(chat.MAIL_PER_NAME - 1):
            bob.send('/msg ann note %d\n' % number)
        bob.send('/msg ann one too many\n')
        bob.expect(r'^!!! ann has 50 messages waiting already: this one is not kept$')
        server.finish()
        again = self.serve()
        again.wait_log(r'data: 1 registered name, 50 waiting messages and \d+ open sessions?')
        ann = self.join(again, 'guest')
        ann.send('/nick ann correct horse\n')
        ann.expect(r'^-!- 50 messages waited for you:$')
        self.assertRegex(ann.line(), REPLAYED_LINE + r'\[PM from bob\] are you coming '
                                                     r'tonight\?$')
        mails = [ann.line() for _ in range(49)]
        self.assertRegex(mails[-1], r'\] \[PM from bob\] note 48$')
        ann.send('/quit\n')
        ann.expect_closed()
        again.finish()
        third = self.serve()
        third.wait_log(r'data: 1 registered name, 0 waiting messages')  # given once

    def test_register_needs_data(self):
        server = ServerProcess('--rate', '0')
        self.addCleanup(server.stop)
        ann = self.join(server, 'ann')
        ann.send('/register correct horse\n')
        ann.expect(r'^!!! this server keeps no names: it runs without --data$')


class TestResumeAfterRestart(SessionPeers, DataTests, unittest.TestCase):
    """With --data, a session outlives a restart of the server: the name
    and room wait for it, and it is sent the lines it missed, once."""

    def setUp(self):
        DataTests.setUp(self)
        self.conns = []
        self.srv = self.serve()

    def restart(self, sig=signal.SIGKILL):
        port = self.srv.port
        self.srv.finish(sig)
        self.srv = self.serve(port=port)

    def test_kill_9_then_resume_with_exactly_the_lines_missed(self):
        ann, token = self.session('ann')
        bob = self.connect_by_name('bob')
        ann.send('/join dev\n')
        ann.expect(r'^-!- 1 online in #dev: ann$')
        bob.send('/join dev\n')
        ann.expect(r'^-!- bob joined$')
        bob.send('heard 1\nheard 2\n')
        ann.expect(r'^<bob> heard 2$')
        ann.send('said by ann\n')  # its own: never sent back to it
        roundtrip(ann)
        self.cut_off(ann, bob)
        bob.send('missed before the restart\n')
        roundtrip(bob)
        self.restart()
        self.conns = []
        self.srv.wait_log(r'data: 2 sessions wait for their clients for 10 min')
        cy = self.connect_by_name('cy')
        cy.send('/nick ann\n')
        cy.expect(r'^!!! cannot use the name ann: the name is taken by ann, whose connection '
                  r'was lost')
        cy.send('/who #dev\n')
        cy.expect(r'^-!- 2 online in #dev: ann \(lost\), bob \(lost\)$')
        cy.send('/join dev\nmissed after the restart\n')
        roundtrip(cy)
        for guess in ('A' * 22, token + 'x'):
            thief = self.resume(guess)
            self.assertEqual(thief.line(), '!!! cannot resume: no such session (it may have '
                                           'ended or expired)')
        back = Conn(self.srv.port, hello=False)
        self.addCleanup(back.close)
        # What its client counted: N lines since the token (which a restart
        # cannot use), and P public lines of #dev (heard 1 and 2).
        back.send('/resume %s 99 2\n' % token)
        self.assertEqual(back.line(), '-!- You are back as ann in #dev: 3 lines you missed')
        self.assertRegex(back.line(), REPLAYED_LINE + '<bob> missed before the restart$')
        self.assertEqual([back.line(), back.line()], ['-!- cy joined',
                                                      '<cy> missed after the restart'])
        self.assertRegex(back.line(), RESUME_LINE)
        cy.expect(r'^-!- ann is back$')
        self.srv.wait_log(r'ann resumed from ')
        replay = self.resume(token)  # replaced at the resume, on disk too
        self.assertEqual(replay.line(), '!!! cannot resume: no such session (it may have '
                                        'ended or expired)')

    def test_a_session_that_ended_is_not_restored(self):
        ann, token = self.session('ann')
        ann.send('/quit\n')
        ann.expect_closed()
        self.restart(signal.SIGTERM)
        self.srv.wait_log(r'data: 0 registered names, 0 waiting messages and 0 open sessions')
        thief = self.resume(token)
        self.assertEqual(thief.line(), '!!! cannot resume: no such session (it may have '
                                       'ended or expired)')

    def connect_by_name(self, name):
        conn = self.join(self.srv, name)
        for other in self.conns:
            other.expect(came(name))
        self.conns.append(conn)
        return conn


class TestHistoryCommand(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'history': 3}

    def test_history_replays_earlier_lines_with_when_they_were_said(self):
        ann = self.connect('ann')
        for number in range(30):
            ann.send('line %d\n' % number)
        roundtrip(ann)
        ben = self.connect('ben')  # a newcomer gets --history of them
        self.assertEqual(history_of(ben, 25), ['<ann> line %d' % n for n in range(5, 30)])
        ben.send('/history\n')  # 100 by default: all 30
        self.assertEqual(ben.expect(r'^-!- Last')[1].string, '-!- Last 30 messages:')
        ben.send('/history lots\n/history \u00b2\n')  # "²" is a digit to str.isdigit()
        ben.expect(r'^!!! usage: /history \[N\]$')
        ben.expect(r'^!!! usage: /history \[N\]$')
        ben.send('/join dev\n')
        self.assertEqual(history_of(ben), [])

    def test_history_gives_100_lines_by_default_and_1000_at_most(self):
        ann = self.connect('ann')
        ann.send(''.join('line %d\n' % number for number in range(1100)))
        roundtrip(ann)
        ann.send('/history\n')
        self.assertEqual(ann.expect(r'^-!- Last')[1].string, '-!- Last 100 messages:')
        self.assertRegex(ann.line(), REPLAYED_LINE + '<ann> line 1000$')
        ann.send('/history 5000\n')
        self.assertEqual(ann.expect(r'^-!- Last')[1].string, '-!- Last 1000 messages:')
        self.assertRegex(ann.line(), REPLAYED_LINE + '<ann> line 100$')

    def test_history_fits_one_turns_share(self):
        ann = self.connect('ann')
        for number in range(100):
            ann.send('%03d %s\n' % (number, 'h' * 3000))
        roundtrip(ann)
        ann.send('/history 100\n')
        _, heading = ann.expect(r'^-!- Last (\d+) messages \(as many as fit 64\.0 KiB\):$')
        self.assertLess(int(heading.group(1)), 30)


# --- Server: limits ------------------------------------------------------------

class TestLineLimit(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'max_line': 100}

    def test_long_line_is_refused_and_skipped_and_the_connection_stays(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send('a' * 101 + '\nafter\n' + 'b' * 100 + '\r\n')
        alice.expect(r'^!!! line too long \(over 100 bytes\): not sent$')
        bob.expect(r'^<alice> after$')
        bob.expect(r'^<alice> b{100}$')  # exactly the limit, CRLF not counted

    def test_a_line_that_never_ends_holds_bounded_memory(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        peer = self.srv.peer('alice')
        for _ in range(50):
            alice.send('z' * 1000)
        alice.expect(r'^!!! line too long')
        wait_until(lambda: peer.skipping, 'the server to skip the line')
        self.sync(bob)
        self.assertLessEqual(len(peer.inbuf), 101)
        alice.send('z' * 5000 + '\nnext\n')  # still the same line, then a new one
        before, _ = bob.expect(r'^<alice> next$')
        self.assertEqual(before, [])
        self.assertEqual(self.sync(alice), [])  # refused once, not per read


class TestSlowConsumers(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'max_backlog': 32 * 1024}
    IN_PROCESS = False

    def test_a_peer_that_never_reads_is_cut_off_and_no_one_waits_for_it(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        self.connect('slow', rcvbuf=4096)
        lines = ['line %05d %s' % (i, 'x' * 200) for i in range(2000)]
        self.assertEqual(flood(alice, 'alice', bob, lines), lines)  # all, in order, for bob
        self.srv.wait_log(r'slow is too slow: \d+ bytes unsent')
        self.srv.wait_log(r'slow left \(too slow\)')

    def test_short_writes_deliver_everything_intact(self):
        alice = self.connect('alice')
        bob = self.connect('bob', rcvbuf=4096)
        lines = ['%04d %s' % (i, '한글' * 20) for i in range(300)]  # ~40 KiB
        alice.send(''.join(l + '\n' for l in lines))
        received = []
        while len(received) < len(lines):
            received.append(bob.line())
            time.sleep(0.0005)  # a slow reader: forces partial sends
        self.assertEqual(received, ['<alice> ' + l for l in lines])


class TestBurstsAreSpreadOverTurns(unittest.TestCase):
    """The loop is stepped by hand here, so "a reader that keeps up" is
    exact: it reads everything sent to it between two loop turns."""

    def test_a_reader_that_keeps_up_is_never_cut_off_however_bursty(self):
        server, address = stepped_server(self, rate=0, max_backlog=32 * 1024)
        peers = []
        for _ in range(20):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address)
            sock.sendall(b'\n')  # a chat client speaks first, and joins
            self.addCleanup(sock.close)
            peers.append(sock)
        step_until(server, lambda: len(server.names) == len(peers), 'everyone in')

        def read_all(sock):
            data = bytearray()
            while True:
                try:
                    chunk = sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return bytes(data)
                self.assertTrue(chunk, 'a reader was cut off')
                data += chunk
        for sock in peers:
            read_all(sock)
        # Everyone pastes 8,192 tiny lines at once: 2 MB for each reader,
        # many times its cap and kernel buffers if one turn sent it all.
        for sock in peers:
            sock.sendall(b'x\n' * 8192)
        expected = (len(peers) - 1) * 8192
        received = [0] * len(peers)
        deadline = time.monotonic() + TIMEOUT
        while min(received) < expected and time.monotonic() < deadline:
            server.run_once(timeout=0.1)
            for i, sock in enumerate(peers):
                received[i] += read_all(sock).count(b'> x\n')
        self.assertEqual(received, [expected] * len(peers))
        self.assertEqual(len(server.names), len(peers))


class TestEndOfInputInOneTurn(unittest.TestCase):
    """A line said and another peer's end of input, handled in one loop
    turn in that order (stepped by hand, so the turn is exact)."""

    def test_a_peer_that_ends_its_input_gets_what_was_said_before_in_its_last_turn(self):
        server, address = stepped_server(self, rate=0)
        speaker = socket.create_connection(address)  # first: first in select's order too
        leaver = socket.create_connection(address)
        for sock in (speaker, leaver):
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
            sock.setblocking(False)
        step_until(server, lambda: len(server.names) == 2, 'both in')
        by_address = {peer.sock.getpeername(): peer for peer in server.names.values()}
        speaker_name = by_address[speaker.getsockname()].name
        leaving = by_address[leaver.getsockname()]
        lobby = leaving.room
        # Two quiet turns empty epoll's ready list, so the two events below
        # come in the order they happen; an even turn does not rotate them.
        def quiet():
            for sock in (speaker, leaver):
                recv_now(sock)
            server.run_once(timeout=0)
            server.run_once(timeout=0)
            if server.turn % 2:
                server.run_once(timeout=0)
            return not recv_now(speaker) + recv_now(leaver)
        wait_until(quiet, 'a quiet even turn')
        said_before = len(lobby.history)
        speaker.sendall(b'said just before the end\n')  # on loopback: there on return
        leaver.shutdown(socket.SHUT_WR)
        server.run_once(timeout=TIMEOUT)
        self.assertEqual((len(lobby.history), leaving.close_reason),
                         (said_before + 1, 'connection closed'), 'not one turn')
        received = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            server.run_once(timeout=0.05)
            try:
                chunk = leaver.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        else:
            self.fail('the server did not close the connection')
        self.assertIn('<%s> said just before the end' % speaker_name,
                      received.decode().splitlines())


class TestBackpressure(unittest.TestCase):
    """The real loop, in a process of its own, against readers that read at
    a fixed rate: a reader that keeps up survives any burst within the flood
    limits; one that never reads is still cut off."""

    def test_a_reader_that_keeps_up_survives_bursts_from_many(self):
        server = ServerProcess()  # the defaults: 20-line bursts, 4 KB lines, 256 KiB cap
        self.addCleanup(server.stop)
        reader = Conn(server.port, rcvbuf=16 * 1024)
        self.addCleanup(reader.close)
        reader.expect(r'^-!- 1 online')
        never = Conn(server.port, rcvbuf=4096)  # reads its welcome, then nothing
        self.addCleanup(never.close)
        never.expect(r'^-!- 2 online')
        pasters = [Conn(server.port) for _ in range(6)]
        for paster in pasters:
            self.addCleanup(paster.close)
            paster.expect(r'^-!- \d+ online')
        received, done = bytearray(), threading.Event()

        def read_at_2_mb_per_second():  # 8 KB every 4 ms: it keeps up
            reader.sock.settimeout(TIMEOUT)
            while not done.is_set():
                try:
                    data = reader.sock.recv(8192)
                except OSError:  # closed at the end of the test
                    break
                if not data:
                    break
                received.extend(data)
                time.sleep(0.004)
        thread = threading.Thread(target=read_at_2_mb_per_second)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)  # cleanups run last first:
        self.addCleanup(reader.sock.shutdown, socket.SHUT_RDWR)  # this wakes its recv()
        self.addCleanup(done.set)
        lines = [('%d:%02d ' % (i, n)).ljust(4000, 'x') for n in range(20) for i in range(6)]
        senders = [threading.Thread(target=paster.send, args=(
            ''.join(line + '\n' for line in lines if line.startswith('%d:' % i)),))
            for i, paster in enumerate(pasters)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(TIMEOUT)
        wait_until(lambda: received.count(b'x\n') >= len(lines) or any(
            'guest-1 is too slow' in line for line in server.logs),
            'all %d lines, or the reader cut off' % len(lines), 30)
        self.assertFalse([l for l in server.logs if 'too slow' in l and 'guest-1' in l])
        got = [line.split(b'> ', 1)[1].decode() for line in bytes(received).split(b'\n')
               if line.startswith(b'<guest-') and b'x' in line]
        self.assertEqual(sorted(got), sorted(lines))
        for i in range(6):  # and each paster's lines in its order
            mine = [line for line in got if line.startswith('%d:' % i)]
            self.assertEqual(mine, sorted(mine))
        server.wait_log(r'guest-2 is too slow')  # the one that never reads


class TestKeptRoomsMemory(ServerTestCase):
    """Rooms no one is in are kept for their history (--data); what they
    said, kept for sessions that resume, is bounded in all, not per room."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix='chat-data-')
        self.addCleanup(shutil.rmtree, folder, True)
        self.SERVER_OPTIONS = {'rate': 0, 'max_backlog': 4096, 'data': chat.DataLog(folder),
                               'op_password': 'op'}
        super().setUp()

    def kept_said(self):
        return sum(room.said_bytes for room in self.srv.server.kept_rooms.values())

    def test_what_empty_rooms_said_stays_within_a_bound_the_first_emptied_forget_first(self):
        ann = self.connect('ann')
        line = 'z' * 1000  # 8 of them: half of what one room keeps (4 caps of 4 KiB)
        for number in range(10):  # 10 x 8 KB: more than the 16 caps that empty rooms keep
            ann.send('/join r%d\n%s' % (number, ('%s\n' % line) * 8))
        ann.send('/join lobby\n')
        ann.expect(r'^-!- You are in #lobby')
        roundtrip(ann)
        rooms = [self.srv.server.rooms['r%d' % number] for number in range(10)]
        kept = [room.said_bytes for room in rooms]
        self.assertLessEqual(sum(kept), 4096 * chat.KEPT_SAID_SHARE)
        self.assertEqual(kept[:2], [0, 0])  # the first emptied forgot first...
        self.assertEqual([room.said_from == room.seq for room in rooms[:2]], [True, True])
        self.assertTrue(all(size > 8 * len(line) for size in kept[2:]), kept)  # ...the
        # others keep all they said

    def test_a_wall_keeps_nothing_in_rooms_no_one_is_in(self):
        ann = self.connect('ann')
        for number in range(10):
            ann.send('/join r%d\nhi\n' % number)
        ann.send('/join lobby\n/op op\n')
        ann.expect(r'^-!- ann is now an operator$')
        before = self.kept_said()
        ann.send(('/wall %s\n' % ('w' * 1000)) * 20)  # 20 KB into each of 10 kept rooms
        roundtrip(ann)
        self.assertEqual(self.kept_said(), before)

    def test_a_room_forgotten_past_the_bound_on_rooms_forgets_its_lines_too(self):
        self.addCleanup(setattr, chat, 'KEPT_ROOMS_MAX', chat.KEPT_ROOMS_MAX)
        chat.KEPT_ROOMS_MAX = 3
        ann = self.connect('ann')
        for number in range(6):  # ann's session still has runs in all six
            ann.send('/join r%d\n%s\n/join lobby\n' % (number, 'z' * 1000))
        roundtrip(ann)
        runs = self.srv.peer('ann').session.runs
        rooms = {run[0] for run in runs if run[0] is not None and run[0].key != 'lobby'}
        self.assertEqual(len(rooms), 6)
        self.assertEqual(sorted(room.said_bytes > 0 for room in rooms), [False] * 3 + [True] * 3)


class TestBacklogMemory(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0, 'max_backlog': 32 * 1024}

    def test_memory_stays_bounded_by_peers_times_cap(self):
        alice = self.connect('alice')
        for i in range(4):
            self.connect('idle%d' % i, rcvbuf=4096)
        server = self.srv.server
        peers = list(server.names.values())
        worst = []
        end_turn = server.end_turn

        def measured_end_turn():  # memory held at the end of every loop turn
            end_turn()
            worst.append(sum(len(p.outbuf) for p in peers))
        server.end_turn = measured_end_turn
        alice.send(''.join('%s\n' % ('y' * 300) for _ in range(1000)))
        for i in range(4):
            self.srv.wait_log(r'idle%d left \(too slow\)' % i)
        self.assertGreater(max(worst), server.max_backlog)  # it was put to the test
        self.assertLessEqual(max(worst), len(peers) * server.max_backlog)
        for peer in peers[1:]:  # cut off, and their memory freed
            self.assertIsNone(peer.sock)
            self.assertEqual(len(peer.outbuf), 0)

    def test_a_message_is_encoded_once_for_all_recipients(self):
        alice = self.connect('alice')
        others = [self.connect('p%d' % i) for i in range(5)]
        server = self.srv.server
        broadcasts, sent = [], []
        lobby = server.lobby
        broadcast, send_fresh = lobby.broadcast, server.send_fresh
        lobby.broadcast = lambda line, sender=None: (broadcasts.append(line),
                                                     broadcast(line, sender))
        server.send_fresh = lambda peer, data: (sent.append(data), send_fresh(peer, data))
        alice.send('once\nand twice\n')
        for other in others:
            other.expect(r'^<alice> and twice$')
        self.assertEqual(broadcasts, [b'<alice> once\n<alice> and twice\n'])
        self.assertEqual(len(sent), len(others))
        for data in sent:
            self.assertIs(data, sent[0])


class TestFastPath(unittest.TestCase):
    """Server.say_all handles a run of plain lines in one go; it must give
    exactly what handling them one by one gives, or decline."""

    def test_it_matches_the_line_by_line_path(self):
        import random
        rng = random.Random(1234)
        pieces = ['hello', ' ', '한글', '😀', '\x1b[31m', '\r', '\t', '\x07', '\x9b',
                  '\u202e', 'é', '/', '//', '<bob>', 'x' * 30]
        server, _ = stepped_server(self, history=3, rate=0, max_line=200)
        said = declined = 0
        for _ in range(500):
            lines = [''.join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
                     for _ in range(rng.randint(1, 5))]
            raw = '\n'.join(lines).encode() + b'\n' + rng.choice([b'', b'\xff\n', b'tail'])
            peer = chat.Peer(None, 'test', burst=5)
            peer.name, peer.inbuf = 'alice', bytearray(raw)
            peer.lines = 1  # past its first line, which is always checked alone
            peer.room = lobby = server.lobby
            lobby.batch, lobby.batch_bytes = [], 0
            lobby.history = chat.History(lobby.history.most, lobby.history.max_bytes)
            count = server.say_all(peer, None)
            texts = [chat.decode(line) for line in raw[:raw.rindex(b'\n')].split(b'\n')]
            plain = all(text.strip() and not text.startswith('/') for text in texts)
            if not count:  # declined: nothing taken, nothing said
                declined += 1
                self.assertFalse(plain, raw)  # only lines the slow path must see
                self.assertEqual(bytes(peer.inbuf), raw)
                self.assertEqual(lobby.batch, [])
                continue
            said += 1
            self.assertTrue(plain, raw)  # no command or blank line said as text
            expected = [chat.public_line('alice', text) for text in texts]
            self.assertEqual(count, len(expected))
            self.assertEqual([line for _, line in lobby.batch], [b''.join(expected)])
            self.assertEqual([line for _, line in lobby.history][-3:], expected[-3:])
            self.assertEqual(bytes(peer.inbuf), raw[raw.rindex(b'\n') + 1:])
        self.assertGreater(said, 50)
        self.assertGreater(declined, 50)


class TestFloodControl(ServerTestCase):
    SERVER_OPTIONS = {'rate': 20, 'burst': 5}

    def test_input_over_budget_is_delayed_not_dropped(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        alice.send(''.join('flood %02d\n' % i for i in range(30)))
        started = time.monotonic()
        got = [bob.line() for _ in range(5)]
        self.assertTrue(self.srv.peer('alice').paused)
        carol.send('not starved\n')
        while len([l for l in got if l.startswith('<alice>')]) < 30:
            got.append(bob.line())
        elapsed = time.monotonic() - started
        flood = [l for l in got if l.startswith('<alice>')]
        self.assertEqual(flood, ['<alice> flood %02d' % i for i in range(30)])
        self.assertLess(got.index('<carol> not starved'), 25)  # long before the flood's
        # end (at once, in truth: the margin is for a loaded machine's pauses)
        self.assertGreaterEqual(elapsed, 25 / 20 * 0.8)  # 25 lines over budget at 20/s

    def test_paused_input_is_bounded(self):
        alice = self.connect('alice')
        alice.send('p\n' * 20000)  # 40 KB, most of it left in the kernel
        peer = self.srv.peer('alice')
        wait_until(lambda: peer.paused, 'alice to be paused')
        self.assertLessEqual(len(peer.inbuf), chat.READ_CHUNK_BYTES)


class TestNoFloodControl(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def test_rate_zero_lets_a_burst_through_at_once(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        alice.send(''.join('fast %d\n' % i for i in range(500)))
        for i in range(500):  # at 5 lines/s this would take 100 s
            self.assertEqual(bob.line(timeout=5), '<alice> fast %d' % i)
        self.assertFalse(self.srv.peer('alice').paused)


class TestShortHistory(ServerTestCase):
    SERVER_OPTIONS = {'history': 2}

    def test_history_keeps_only_the_last_n(self):
        alice = self.connect('alice')
        alice.send(''.join('message %d\n' % i for i in range(5)))  # one read, or a few
        self.sync(alice)
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        lines, _ = conn.expect(r'^\[\S+\] <alice> message 4$')
        self.assertEqual(lines[-2], '-!- Last 2 messages:')
        self.assertRegex(lines[-1], r'^\[\S+\] <alice> message 3$')


class TestBigRooms(ServerTestCase):
    """Joins and leaves are announced together when many come at once, and
    lists of who is online stay bounded."""
    SERVER_OPTIONS = {'rate': 0}

    def raw_peers(self, count):
        """count connections opened at once, each past its welcome."""
        conns = [Conn(self.srv.port) for _ in range(count)]
        for conn in conns:
            self.addCleanup(conn.close)
            conn.name = conn.expect(r'^-!- Welcome, (\S+)!')[1].group(1)
            conn.expect(r'^-!- \d+ online')
        return conns

    def test_a_join_storm_is_announced_in_a_few_combined_lines(self):
        watcher = self.connect('watcher')
        self.raw_peers(30)
        joined, lines = 0, 0
        while joined < 30:
            text = watcher.line()
            lines += 1
            match = re.match(r'^-!- (?:(\d+) people joined: (.*)|guest-\d+ joined)$', text)
            self.assertTrue(match, text)
            if match.group(1):
                joined += int(match.group(1))
                listed = match.group(2).split(', ')
                self.assertLessEqual(len(listed), chat.NOTICE_NAMES)
                if int(match.group(1)) > chat.NOTICE_NAMES:
                    self.assertRegex(match.group(2), r' and \d+ others$')
            else:
                joined += 1
        self.assertLess(lines, 10)  # not one line per join

    def test_no_one_hears_a_newcomer_before_hearing_it_came(self):
        watcher = self.connect('watcher')
        newcomer = Conn(self.srv.port)  # the watcher's join was just announced,
        self.addCleanup(newcomer.close)  # so this one's waits for the interval
        newcomer.send('hi, I am new\n')
        before, _ = watcher.expect(r'^<guest-2> hi, I am new$')
        self.assertEqual(before, ['-!- guest-2 joined'])

    def test_leaves_at_once_are_announced_together_with_reasons(self):
        watcher = self.connect('watcher')
        conns = self.raw_peers(3)
        watcher.expect(r'guest-4')
        self.sync(watcher)  # the joins are announced; leaves start a new interval
        conns[0].send('/quit bye\n')
        conns[0].expect_closed()
        for conn in conns[1:]:
            conn.sock.shutdown(socket.SHUT_WR)  # leaving (a reset would be a lost connection)
        lines = [watcher.line()]
        if lines[0] == '-!- %s left (quit: bye)' % conns[0].name:  # the first may come alone
            lines.append(watcher.line())
        match = re.match(r'^-!- ([23]) people left: (.*)$', lines[-1])
        self.assertTrue(match, lines)
        entries = set(match.group(2).split(', '))
        self.assertEqual(len(entries), int(match.group(1)))
        for name in (conns[1].name, conns[2].name):
            self.assertIn('%s (connection closed)' % name, entries)

    def test_the_welcome_names_a_few_and_counts_the_rest(self):
        self.raw_peers(chat.WELCOME_NAMES + 5)
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- You are in #lobby$')
        self.assertRegex(conn.line(), r'^-!- 26 online in #lobby: (guest-\d+, ){19}guest-\d+ '
                                      r'and 6 others \(/who lists them\)$')

    def test_who_pages_and_filters(self):
        self.patch_who_page(3)
        peers = [self.connect(name) for name in ('kim1', 'kim2', 'lee', 'Kimura', 'park')]
        asker = peers[0]
        asker.send('/who\n')
        asker.expect(r'^-!- 5 online in #lobby, page 1 of 2 \(/who \+N for page N\): '
                     r'kim1, kim2, Kimura$')
        asker.send('/who +2\n')
        asker.expect(r'^-!- 5 online in #lobby, page 2 of 2 .*: lee, park$')
        asker.send('/who +3\n')
        asker.expect(r'^!!! there is no page 3: /who has 2 pages$')
        asker.send('/who KIM\n')
        asker.expect(r'^-!- 3 of 5 online in #lobby match "kim": kim1, kim2, Kimura$')
        asker.send('/who nobody\n')
        asker.expect(r'^-!- 0 of 5 online in #lobby match "nobody": $')

    def patch_who_page(self, size):
        original = chat.WHO_PAGE_NAMES
        chat.WHO_PAGE_NAMES = size
        self.addCleanup(setattr, chat, 'WHO_PAGE_NAMES', original)


class TestNoHistory(ServerTestCase):
    SERVER_OPTIONS = {'history': 0}

    def test_history_zero_replays_nothing(self):
        alice = self.connect('alice')
        alice.send('not kept\n')
        self.sync(alice)
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- You are in #lobby$')
        self.assertEqual(conn.line(), '-!- 2 online in #lobby: alice, guest-2')
        conn.expect(r'^-!- To resume after a lost connection: ')
        alice.send('live\n')
        self.assertEqual(conn.line(), '<alice> live')


class TestMaxClients(ServerTestCase):
    SERVER_OPTIONS = {'max_clients': 2}

    def test_extra_connections_get_one_error_line(self):
        alice = self.connect('alice')
        self.connect('bob')
        extra = Conn(self.srv.port)
        self.addCleanup(extra.close)
        self.assertEqual(extra.expect_closed(),
                         ['!!! server full (2 clients); try later'])
        self.srv.wait_log(r'refused 127\.0\.0\.1:\d+: server full')
        alice.send('/quit\n')
        alice.expect_closed()
        self.conns.remove(alice)
        self.connect('carol')  # a slot freed is a slot again


# --- Server: robustness --------------------------------------------------------

class TestRobustness(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def test_reset_mid_line_affects_no_one_else(self):
        alice, bob, carol = self.connect('alice'), self.connect('bob'), self.connect('carol')
        bob.send('half a li')
        self.sync(alice)
        bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\1\0\0\0\0\0\0\0')
        bob.close()  # linger 0: the close sends a reset
        before, _ = alice.expect(r'^-!- bob (lost the connection|left \(connection closed\))$')
        self.assertEqual(before, [])  # the unfinished line is not delivered
        alice.send('still fine\n')
        carol.expect(r'^<alice> still fine$')

    def test_vanishing_mid_line_delivers_nothing(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        bob.send('unfinis')
        bob.close()
        before, _ = alice.expect(r'^-!- bob left \(connection closed\)$')
        self.assertEqual(before, [])

    def test_half_close_still_gets_its_answers(self):
        alice, bob = self.connect('alice'), self.connect('bob')
        bob.send('last words\n/who\n')
        bob.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(bob.expect_closed(), ['-!- 2 online in #lobby: alice, bob'])
        alice.expect(r'^<bob> last words$')
        alice.expect(r'^-!- bob left \(connection closed\)$')

    def test_an_error_in_a_handler_closes_only_that_peer(self):
        alice, bob = self.connect('alice'), self.connect('bob')

        def broken(pattern):
            raise RuntimeError('boom')
        self.srv.server.lobby.names_matching = broken  # what /who calls
        self.conns.remove(bob)
        bob.send('/who\n')
        alice.expect(r'^-!- bob left \(server error\)$')
        self.srv.wait_log(r"internal error with bob: RuntimeError\('boom'")
        carol = self.connect('carol')
        carol.send('fine\n')
        alice.expect(r'^<carol> fine$')


# --- The server process --------------------------------------------------------

def cpu_seconds(pid):
    """User plus system CPU time of a process (Linux /proc)."""
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class TestServerProcess(unittest.TestCase):

    def start(self, *args, **kw):
        server = ServerProcess(*args, **kw)
        self.addCleanup(server.stop)
        return server

    def test_banner_says_where_it_listens_and_how_to_join(self):
        server = self.start()
        self.assertRegex(server.banner, r'^chat\.py \S+ listening on 127\.0\.0\.1:\d+\n$')
        join = server.proc.stdout.readline()
        self.assertEqual(join, 'join with: python3 chat.py client 127.0.0.1:%d   '
                               '(or: nc 127.0.0.1 %d)\n' % (server.port, server.port))
        self.assertEqual(server.proc.stdout.readline(),
                         '       or open http://127.0.0.1:%d/ in a browser\n' % server.port)
        self.assertEqual(server.proc.stdout.readline(), 'security: no TLS (anyone on the network '
                         'can read the room), no room password, no operators\n')

    def test_banner_says_a_password_and_operators_are_on(self):
        server = self.start(env=dict(os.environ, CHAT_PASSWORD='room secret',
                                     CHAT_OP_PASSWORD='op secret'))
        lines = [server.proc.stdout.readline() for _ in range(3)]
        self.assertEqual(lines[2], 'security: no TLS (anyone on the network can read the '
                                   'room), a room password, operators (/op)\n')

    def test_default_listens_on_ipv4_and_ipv6(self):
        server = self.start(host=None)
        self.assertRegex(server.banner, r'listening on \[::\]:\d+ \(IPv4 and IPv6\)')
        self.assertRegex(server.proc.stdout.readline(),
                         r'^join with: python3 chat\.py client \S+:%d ' % server.port)
        for host in ('127.0.0.1', '::1'):
            conn = Conn(server.port, host=host)
            self.addCleanup(conn.close)
            conn.expect(r'^-!- Welcome, guest-\d+!')
        server.wait_log(r'guest-1 joined from 127\.0\.0\.1:\d+$')
        server.wait_log(r'guest-2 joined from \[::1\]:\d+$')

    def test_sigterm_and_sigint_close_politely_and_exit_zero(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            server = self.start()
            conn = Conn(server.port)
            self.addCleanup(conn.close)
            conn.expect(r'^-!- \d+ online')
            server.wait_log(r'guest-1 joined')
            status, out, log = server.finish(sig)
            self.assertEqual(status, 0)
            self.assertEqual(conn.expect_closed()[-1:], ['-!- server shutting down'])
            self.assertIn('shutting down', log)
            self.assertNotIn('Traceback', log)

    def test_shutdown_does_not_wait_long_for_a_peer_that_never_reads(self):
        server = self.start('--rate=0', '--max-backlog=100M')
        stuck = Conn(server.port, rcvbuf=4096)
        stuck.expect(r'^-!- Welcome, guest-1!')  # joined in this order
        observer = Conn(server.port)
        observer.expect(r'^-!- Welcome, guest-2!')
        talker = Conn(server.port)
        for conn in (stuck, observer, talker):
            self.addCleanup(conn.close)
        talker.expect(r'^-!- 3 online')
        observer.expect(r'^-!- .*guest-3')  # its joining, alone or with guest-2's
        talker.send(('z' * 1000 + '\n') * 2000)  # 2 MB that stuck never reads
        for _ in range(2000):  # once the observer has it all, stuck's backlog is full
            observer.expect(r'^<guest-3> z+$')
        started = time.monotonic()
        status, _, _ = server.finish()
        self.assertEqual(status, 0)
        self.assertLess(time.monotonic() - started, 3 * chat.SHUTDOWN_FLUSH_SEC)

    def test_a_log_pipe_that_closes_does_not_stop_the_server(self):
        proc = subprocess.Popen([sys.executable, CHAT, 'server', '0', '--host', '127.0.0.1'],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        port = int(re.search(r':(\d+)', proc.stdout.readline()).group(1))
        proc.stderr.close()  # whoever read its log has gone
        alice, bob = Conn(port), Conn(port)
        for conn in (alice, bob):
            self.addCleanup(conn.close)
            conn.expect(r'^-!- 2 online|^-!- 1 online')
        alice.send('still here\n')  # each join and line was a log line to a closed pipe
        bob.expect(r'^<guest-\d> still here$')
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        proc.stdout.close()

    def test_sighup_reads_the_motd_and_passwords_again_dropping_no_one(self):
        folder = tempfile.mkdtemp(prefix='chat-test-')
        self.addCleanup(shutil.rmtree, folder, True)
        motd, password = os.path.join(folder, 'motd'), os.path.join(folder, 'pw')
        for path, text in ((motd, 'Old news\n\x1b[31mred\n'), (password, 'first\n')):
            with open(path, 'w') as handle:
                handle.write(text)
        server = self.start('--motd', motd, '--password-file', password)
        member = Conn(server.port)
        self.addCleanup(member.close)
        member.expect(re.escape(chat.PASSWORD_PROMPT))
        member.send('/pass first\n')
        member.expect(r'^-!- Welcome, ')
        self.assertEqual([member.line(), member.line()], ['-!- Old news', '-!- [31mred'])
        for path, text in ((motd, 'New news\n'), (password, 'second\n')):
            with open(path, 'w') as handle:
                handle.write(text)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_log(r'reloaded: the MOTD \(1 line\) and the password files')
        member.send('/motd\n')  # still here, and the new MOTD
        member.expect(r'^-!- New news$')
        newcomer = Conn(server.port)
        self.addCleanup(newcomer.close)
        newcomer.expect(re.escape(chat.PASSWORD_PROMPT))
        newcomer.send('/pass first\n/pass second\n')
        newcomer.expect(r'^!!! wrong password')
        newcomer.expect(r'^-!- New news$')

    def test_quiet_logs_nothing(self):
        server = self.start('--quiet')
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- \d+ online')
        conn.send('/nick talker\nhello\n/quit\n')
        conn.expect_closed()
        status, _, log = server.finish()
        self.assertEqual((status, log), (0, ''))

    def test_logs_are_timestamped_and_escaped(self):
        server = self.start()
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- \d+ online')
        conn.send('/nick 김철수\n/quit bye\n')
        conn.expect_closed()
        server.wait_log(r'left \(quit: bye\)')
        for line in server.logs:
            self.assertRegex(line, r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ')
        self.assertIn('guest-1 is now known as 김철수', '\n'.join(server.logs))

    def test_port_in_use_is_one_clear_line(self):
        first = self.start()
        result = run_chat('server', str(first.port), '--host', '127.0.0.1')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, 'chat.py: error: port %d is already in use on '
                         '127.0.0.1 (is another server running?)\n' % first.port)

    def test_permission_denied_is_one_clear_line(self):
        self.assertEqual(chat.bind_error(OSError(errno.EACCES, 'Permission denied'), 'x', 80),
                         'permission denied to listen on port 80 (ports below 1024 need root)')
        try:  # the first port anyone may listen on
            with open('/proc/sys/net/ipv4/ip_unprivileged_port_start') as setting:
                unprivileged = int(setting.read())
        except OSError:
            unprivileged = 1024
        if unprivileged == 0:
            return  # every port is open to anyone here: the message is all there is to test
        port = min(80, unprivileged - 1)
        # Even root is refused once it drops the right to bind low ports
        # (prctl PR_CAPBSET_DROP of CAP_NET_BIND_SERVICE, as setpriv does).
        drop = ('import ctypes, os, sys; ctypes.CDLL(None).prctl(24, 10, 0, 0, 0); '
                'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')
        result = subprocess.run([sys.executable, '-c', drop, CHAT, 'server', str(port), '--host',
                                 '127.0.0.1'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, 'chat.py: error: permission denied to listen on '
                         'port %d (ports below 1024 need root)\n' % port)

    def test_running_out_of_file_descriptors_pauses_accepting(self):
        import resource

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        server = self.start('--max-clients=1000', '--rate=0', preexec_fn=low_limit)
        conns = []
        for _ in range(60):  # more than 40 descriptors: the kernel queues the rest
            conns.append(Conn(server.port))
            self.addCleanup(conns[-1].close)
        server.wait_log(r'out of file descriptors \(Too many open files\): pausing')
        before = cpu_seconds(server.proc.pid)
        time.sleep(1.5)  # three pauses long: it must idle, not spin
        self.assertLess(cpu_seconds(server.proc.pid) - before, 0.5)
        for conn in conns[:40]:  # room for all that wait
            conn.close()
        conns[-1].expect(r'^-!- Welcome, guest-\d+!')  # the last one gets in at last
        self.assertEqual(sum('out of file descriptors' in l for l in server.logs), 1)
        status, _, _ = server.finish()
        self.assertEqual(status, 0)


# --- The command line ----------------------------------------------------------

class TestCommandLine(unittest.TestCase):

    def test_help_and_version(self):
        for args in (['--help'], ['server', '-h'], ['client', '-h']):
            result = run_chat(*args)
            self.assertEqual(result.returncode, 0, args)
            self.assertIn('usage: chat.py', result.stdout)
        self.assertIn('--max-backlog', run_chat('server', '--help').stdout)
        self.assertIn('--name', run_chat('client', '--help').stdout)
        result = run_chat('--version')
        self.assertEqual(result.stdout.strip(), 'chat.py ' + chat.__version__)

    def test_bad_arguments_exit_2_with_usage(self):
        for args in ([], ['serve'], ['server', 'notaport'], ['server', '70000'],
                     ['server', '--rate', '-1'], ['client', 'h', '1', '--bogus'],
                     ['server', '--max-backlog', 'lots']):
            result = run_chat(*args)
            self.assertEqual(result.returncode, 2, args)
            self.assertIn('usage:', result.stderr)
            self.assertNotIn('Traceback', result.stderr)

    def test_the_guesses_newcomers_make_work(self):
        server = ServerProcess(host=None)  # IPv4 and IPv6
        self.addCleanup(server.stop)
        port = str(server.port)
        for args in (['--host', '127.0.0.1', '--port', port, '--nick', 'flags'],
                     ['127.0.0.1:' + port, '--name', 'colon'],
                     ['[::1]:' + port, '--name', 'brackets'],
                     ['::1', port, '--name', 'six']):
            result = run_chat('client', *args, stdin_data='')
            self.assertEqual((result.returncode, result.stderr), (0, ''), args)
            self.assertIn('is now known as %s' % args[-1], result.stdout)
        result = run_chat('client', '127.0.0.1:%s' % port, '9')
        self.assertEqual((result.returncode, result.stderr),
                         (1, 'chat.py: error: two different ports given: %s and 9\n' % port))
        started = subprocess.Popen([sys.executable, CHAT, 'server', '--port', '0', '--host',
                                    '127.0.0.1'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, universal_newlines=True)
        self.addCleanup(started.wait, TIMEOUT)
        self.addCleanup(started.terminate)
        self.addCleanup(started.stdout.close)
        self.assertRegex(started.stdout.readline(), r'listening on 127\.0\.0\.1:\d+')

    def test_a_missing_command_says_what_was_meant(self):
        for args, meant in ((['serve'], 'python3 chat.py server'),
                            (['192.168.1.20'], 'python3 chat.py client 192.168.1.20'),
                            (['clinet', 'host', '9000'], 'python3 chat.py client host 9000')):
            result = run_chat(*args)
            self.assertEqual(result.returncode, 2, args)
            self.assertTrue(result.stderr.strip().endswith('did you mean: ' + meant),
                            result.stderr)

    def test_it_runs_as_a_program_and_tells_old_pythons_what_to_do(self):
        self.assertTrue(os.access(CHAT, os.X_OK), 'chat.py is not executable')
        result = subprocess.run([CHAT, '--version'], stdout=subprocess.PIPE, timeout=TIMEOUT,
                                universal_newlines=True)
        self.assertEqual(result.stdout.strip(), 'chat.py ' + chat.__version__)
        pythons2 = glob.glob(os.path.expanduser('~/.pyenv/versions/2.*/bin/python2'))
        python2 = (pythons2 + [path for path in ('/usr/bin/python2', '/usr/bin/python2.7')
                               if os.path.exists(path)] + [None])[0]
        with open(CHAT, encoding='utf-8') as source:
            statements = [line for line in source.read().split('"""', 2)[2].splitlines()
                          if line.strip() and not line.startswith('#')]
        # The first statement after the docstring is the one 2.7 and 3.0-3.5
        # cannot parse, and it says what to do.
        self.assertEqual(statements[0],
                         "f'chat.py needs Python 3.6 or newer: run it with python3'")
        if python2:  # and it is what Python 2 shows
            result = subprocess.run([python2, CHAT, 'server'], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, universal_newlines=True,
                                    timeout=TIMEOUT)
            self.assertIn('chat.py needs Python 3.6 or newer: run it with python3', result.stderr)
            self.assertIn('SyntaxError', result.stderr)

    def test_sizes_take_k_and_m(self):
        self.assertEqual(chat.byte_size('256K'), 256 * 1024)
        self.assertEqual(chat.byte_size('2m'), 2 * 1024 * 1024)
        self.assertEqual(chat.byte_size('4096'), 4096)

    def test_unknown_host_is_one_clear_line(self):
        result = run_chat('client', 'no-such-host.invalid', '9')
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r'^chat\.py: error: cannot find host '
                         r'no-such-host\.invalid: .+\n$')

    def test_connection_refused_is_one_clear_line(self):
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]  # nothing listens once it is closed
        result = run_chat('client', '127.0.0.1', str(port))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, 'chat.py: error: cannot connect to 127.0.0.1 port '
                         '%d: connection refused (is the server running?)\n' % port)


# --- The client --------------------------------------------------------------

class ClientProcess:
    """python chat.py client as a subprocess, its output read with deadlines."""

    def __init__(self, port, *args, host='127.0.0.1', env=None, command=None):
        self.proc = subprocess.Popen(
            command or [sys.executable, CHAT, 'client', host, str(port)] + list(args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def expect(self, pattern):
        """Read output lines until one matches; the raw lines before it."""
        before = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                raw = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError('client printed no %r; saw %r' % (pattern, before))
            if raw is None:
                raise AssertionError('client exited before %r; saw %r' % (pattern, before))
            if re.search(pattern, raw.decode('utf-8')):
                return before
            before.append(raw)

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def finish(self):
        """Close its input; its exit status and standard error."""
        self.proc.stdin.close()
        self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, err


def read_to_the_end(pipe):
    """All a pipe gives until its end; fail at the deadline."""
    received, deadline = b'', time.monotonic() + TIMEOUT
    while True:
        if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError('no end within %ss: %r' % (TIMEOUT, received[-300:]))
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            return received
        received += chunk


def data_segments_in(sock):
    """How many TCP segments with data sock has received (Linux's tcp_info)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from('I', info, 152)[0]  # tcpi_data_segs_in


class FakeServer:
    """A listening socket the test drives by hand, to play a bad server."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]

    def accept(self):
        sock, _ = self.listener.accept()
        sock.settimeout(TIMEOUT)
        return sock

    def close(self):
        self.listener.close()


class TestClient(ServerTestCase):
    SERVER_OPTIONS = {'rate': 20, 'burst': 5}

    def start_client(self, *args, **kw):
        client = ClientProcess(self.srv.port, *args, **kw)
        self.addCleanup(lambda: client.proc.poll() is None and client.proc.kill())
        return client

    def test_piped_lines_are_sent_then_it_quits_with_status_zero(self):
        bob = self.connect('bob')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'piper',
                          stdin_data='hi\nthere\nno newline at the end')
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        self.assertRegex(result.stdout, r'^-!- Welcome, guest-\d+!')
        self.assertNotIn('\x1b', result.stdout)
        bob.expect(r'^<piper> hi$')
        self.assertEqual(bob.line(), '<piper> there')
        self.assertEqual(bob.line(), '<piper> no newline at the end')
        self.assertEqual(bob.line(), '-!- piper left (quit)')

    def test_a_pasted_block_arrives_whole_and_in_order(self):
        bob = self.connect('bob')
        lines = ['line %02d' % i for i in range(40)]  # 35 over the burst of 5
        result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'paster',
                          stdin_data=''.join(l + '\n' for l in lines))
        self.assertEqual(result.returncode, 0)
        bob.expect(came('paster'))
        self.assertEqual([bob.line() for _ in lines], ['<paster> ' + l for l in lines])

    def test_incoming_lines_are_printed_while_it_waits_for_input(self):
        bob = self.connect('bob')
        client = self.start_client('--name', 'reader')
        client.expect(r'^-!- guest-\d+ is now known as reader$')
        bob.expect(came('reader'))
        bob.send('hello reader\n')
        client.expect(r'^<bob> hello reader$')
        client.send('hello bob\n')
        bob.expect(r'^<reader> hello bob$')
        self.assertEqual(client.finish(), (0, ''))

    def test_a_refused_name_piped_sends_nothing_and_fails(self):
        alice = self.connect('alice')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'ALICE',
                          stdin_data='hi\n')
        self.assertEqual(result.returncode, 1)
        self.assertIn('!!! cannot use the name ALICE: the name is taken by alice', result.stdout)
        self.assertEqual(result.stderr, 'chat.py: error: cannot use the name ALICE: the name '
                                        'is taken by alice\n')
        self.assertFalse([line for line in self.sync(alice) if line.startswith('<')])

    def test_piped_it_prints_what_comes_after_joining_unless_asked_for_history(self):
        alice = self.connect('alice')
        alice.send('said before\n')
        self.sync(alice)
        for args, replayed in (((), False), (('--history',), True)):
            result = run_chat('client', '127.0.0.1', str(self.srv.port), *args, stdin_data='')
            self.assertEqual(result.returncode, 0)
            self.assertEqual('<alice> said before' in result.stdout, replayed, result.stdout)
            self.assertEqual('-!- Last 1 message:' in result.stdout, replayed)

    def test_the_default_name_is_the_login_name(self):
        bob = self.connect('bob')
        env = dict(os.environ, LOGNAME='tester')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), stdin_data='', env=env)
        self.assertEqual(result.returncode, 0)
        self.assertIn('-!- guest-2 is now known as tester', result.stdout)

    def test_no_standard_input_at_all(self):
        bob = self.connect('bob')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'mute',
                          stdin=subprocess.DEVNULL)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        self.srv.wait_log(r'mute left \(quit\)')  # (too soon for bob to have been told)

    def test_input_from_a_regular_file(self):
        bob = self.connect('bob')
        with tempfile.TemporaryFile() as notes:  # epoll cannot watch a file
            notes.write('from a file\n두 번째 줄\n'.encode())
            notes.seek(0)
            result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'filer',
                              stdin=notes)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        bob.expect(r'^<filer> from a file$')
        self.assertEqual(bob.line(), '<filer> 두 번째 줄')

    def test_the_stdin_thread_used_on_windows_works_here_too(self):
        bob = self.connect('bob')
        env = dict(os.environ, CHAT_STDIN_THREAD='1')
        client = self.start_client('--name', 'threaded', env=env)
        bob.expect(came('threaded'))
        client.send('typed while\n')
        bob.expect(r'^<threaded> typed while$')
        bob.send('messages arrive\n')
        client.expect(r'^<bob> messages arrive$')
        self.assertEqual(client.finish(), (0, ''))
        bob.expect(r'^-!- threaded left \(quit\)$')

    def test_ctrl_c_and_sigterm_exit_quietly(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            client = self.start_client('--name', 'sig%d' % sig)
            client.expect(r'is now known as sig%d$' % sig)
            client.proc.send_signal(sig)
            self.assertEqual(client.finish(), (0, ''))

    def test_after_quit_it_waits_as_long_as_the_servers_rate_needs(self):
        server = ServerProcess('--rate=1', '--burst=1')
        self.addCleanup(server.stop)
        watcher = Conn(server.port)
        self.addCleanup(watcher.close)
        watcher.expect(r'^-!- 1 online')
        lines = ['slow %d' % i for i in range(8)]  # 7 s at one a second, more than
        result = run_chat('client', '127.0.0.1', str(server.port), '--name', 'patient',
                          stdin_data=''.join(l + '\n' for l in lines), timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, ''))  # QUIT_WAIT_SEC
        self.assertIn('-!- flood control: your lines wait, 1 per second', result.stdout)
        self.assertTrue(result.stdout.endswith('-!- Goodbye\n'), result.stdout)  # it waited
        watcher.expect(r'^<patient> slow 7$')

    def test_output_to_a_closed_pipe_ends_it_quietly(self):
        bob = self.connect('bob')
        proc = subprocess.Popen([sys.executable, CHAT, 'client', '127.0.0.1', str(self.srv.port),
                                 '--name', 'headless'], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        bob.expect(came('headless'))
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1` once it has its line
        for i in range(100):  # until a write to the closed pipe fails
            if proc.poll() is not None:
                break
            bob.send('line %d\n' % i)
            self.sync(bob)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(proc.stderr.read(), b'')
        for pipe in (proc.stdin, proc.stderr):
            pipe.close()

    def test_ipv6_literal_host(self):
        server = ServerProcess(host='::1')
        self.addCleanup(server.stop)
        result = run_chat('client', '::1', str(server.port), '--name', 'six', stdin_data='')
        self.assertEqual(result.returncode, 0)
        self.assertIn('is now known as six', result.stdout)


class TestClientAgainstABadServer(unittest.TestCase):

    def setUp(self):
        self.fake = FakeServer()
        self.addCleanup(self.fake.close)

    def accept(self, first_line):
        """Accept the client, send it its first line, and read its /nick, so
        that closing later sends a FIN rather than a reset."""
        sock = self.fake.accept()
        sock.sendall(first_line)
        received = b''
        while not received.endswith(b'/nick x\n'):
            received += sock.recv(100)
        return sock

    def test_server_gone_is_a_clear_line_and_a_failure(self):
        client = ClientProcess(self.fake.port, '--name', 'x')
        sock = self.accept(b'-!- Welcome, guest-1!\n')
        client.expect(r'^-!- Welcome, guest-1!$')
        sock.close()
        status, err = client.finish()
        self.assertEqual((status, err), (1, 'chat.py: the server closed the connection\n'))

    def test_a_reset_during_the_password_exchange_is_one_line(self):
        client = ClientProcess(self.fake.port, env=dict(os.environ, CHAT_PASSWORD='pw'))
        sock = self.fake.accept()
        sock.sendall(('-!- %s\n' % chat.PASSWORD_PROMPT).encode())
        sock.recv(100)  # its /pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\1\0\0\0\0\0\0\0')
        sock.close()  # a reset
        client.proc.stdin.close()
        self.assertEqual(client.proc.wait(TIMEOUT), 1)
        error = client.proc.stderr.read().decode()
        self.assertRegex(error, r'^chat\.py: error: [^\n]+\n$')
        for pipe in (client.proc.stdout, client.proc.stderr):
            pipe.close()

    def test_a_trickle_after_the_password_has_one_deadline_too(self):
        client = ClientProcess(self.fake.port, env=dict(os.environ, CHAT_PASSWORD='pw'))
        sock = self.fake.accept()
        self.addCleanup(sock.close)
        started = time.monotonic()  # before the prompt: the client's deadline starts after it
        sock.sendall(('-!- %s\n' % chat.PASSWORD_PROMPT).encode())
        sock.recv(100)  # its /pass
        sock.settimeout(0.2)  # a byte every 0.2 s, never a newline
        closed = False
        while not closed:
            self.assertLess(time.monotonic() - started, chat.CONNECT_TIMEOUT_SEC + TIMEOUT,
                            'the client still waits')
            try:
                sock.sendall(b'.')
                closed = sock.recv(100) == b''  # it gave up: end of its side
            except socket.timeout:
                pass
            except OSError:
                closed = True
        status, err = client.finish()
        self.assertEqual((status, err), (1, 'chat.py: error: the server did not answer\n'))
        self.assertGreaterEqual(time.monotonic() - started, chat.CONNECT_TIMEOUT_SEC * 0.9)

    def test_escape_sequences_from_the_server_never_reach_the_output(self):
        client = ClientProcess(self.fake.port, '--name', 'x')
        sock = self.accept('\x1b[31mred\x1b[0m\x07 \r<bob> forged\x9b2J\u202eevil\x1b]0;t\x07\n'
                           .encode())
        sock.sendall('unfinished \x1b[1m'.encode())
        sock.close()
        client.proc.wait(TIMEOUT)
        out = b''.join(iter(client.lines.get, None))
        self.assertEqual(out.decode(), '[31mred[0m <bob> forged2Jevil]0;t\nunfinished [1m\n')
        client.finish()


    def test_a_line_that_never_ends_is_refused_before_the_room(self):
        client = ClientProcess(self.fake.port, '--name', 'x')
        sock = self.fake.accept()
        self.addCleanup(sock.close)
        sock.sendall(b'x' * (chat.CLIENT_MAX_LINE_BYTES + 1000))  # and no newline, ever
        status, err = client.finish()
        self.assertEqual((status, err), (1, 'chat.py: error: the server sent a line longer '
                                            'than %d bytes\n' % chat.CLIENT_MAX_LINE_BYTES))

    def test_a_trickle_does_not_hold_the_client_at_the_door(self):
        # A byte every 0.2 s, never a newline: each read alone is quick, so
        # only a deadline on the whole wait ends it.
        started = time.monotonic()  # before the client starts: all of its wait is after
        client = ClientProcess(self.fake.port, '--name', 'x')
        sock = self.fake.accept()
        self.addCleanup(sock.close)
        sock.settimeout(0.2)
        received = b''
        while b'/nick x' not in received:  # the client moved on, into the room
            self.assertLess(time.monotonic() - started, TIMEOUT, 'the client still waits')
            sock.sendall(b'.')
            try:
                received += sock.recv(100)
            except socket.timeout:
                pass
        self.assertGreaterEqual(time.monotonic() - started, chat.FIRST_LINE_WAIT_SEC * 0.9)
        client.proc.kill()
        client.finish()


# --- The bench ---------------------------------------------------------------

class TestBench(unittest.TestCase):

    def bench(self, *args):
        result = run_chat('bench', *args, timeout=60)
        self.assertNotIn('Traceback', result.stderr)
        return result

    def test_a_wrong_option_starts_no_server(self):
        # run_chat waits for standard error to close: a server left running
        # would hold it open past the timeout.
        result = run_chat('bench', '--clients', '3', '--senders', '5', '--data', timeout=20)
        self.assertEqual((result.returncode, result.stderr),
                         (1, 'chat.py: error: bench: --senders must be fewer than --clients\n'))

    def test_fan_out_with_its_own_server(self):
        result = self.bench('--clients', '20', '--senders', '2', '--messages', '300')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = result.stdout
        self.assertRegex(out, r'deliveries: 11400 in [\d.]+ s = [\d.M]+/s \(lost 0\)')
        self.assertRegex(out, r'latency:    p50 [\d.]+ ms  p90 [\d.]+ ms  p99 [\d.]+ ms  max')
        self.assertRegex(out, r'connect:    20 connections in [\d.]+ s')
        self.assertRegex(out, r'server CPU: [\d.]+ s, [\d.]+ s per million deliveries')
        self.assertRegex(out, r'server mem: [\d.]+ MiB now, [\d.]+ MiB peak')

    def test_a_join_storm_costs_linear_bytes(self):
        result = self.bench('--clients', '400', '--idle')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        match = re.search(r'of joins \((\d+) per client\)', result.stdout)
        # One notice per join to everyone would be ~400 x 20 bytes per client.
        self.assertLess(int(match.group(1)), 2000)
        self.assertIn('broadcast:  1 message reached 399 clients', result.stdout)
        self.assertRegex(result.stdout, r'with 400 idle connections \([+-][\d.]+ KiB each\)')

    def test_an_existing_server_with_slow_consumers(self):
        server = ServerProcess('--rate=0', '--max-backlog=64K')
        self.addCleanup(server.stop)
        result = self.bench('127.0.0.1', str(server.port), '--clients', '10', '--senders',
                            '2', '--messages', '2000', '--size', '200', '--slow', '2',
                            '--server-pid', str(server.proc.pid))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn('deliveries: 36000 in', result.stdout)
        self.assertIn('slow:       2 clients that never read; the server cut off 2',
                      result.stdout)
        server.wait_log(r'left \(too slow\)')

    def test_losses_fail_the_run(self):
        server = ServerProcess()  # flood control on: 5 lines a second
        self.addCleanup(server.stop)
        result = self.bench('127.0.0.1', str(server.port), '--clients', '3', '--senders',
                            '1', '--messages', '1000', '--timeout', '2')
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stdout, r'\(lost [1-9]\d*\)')
        self.assertRegex(result.stderr, r'\.\.\. load: \d+ of 2000 deliveries')  # progress


# --- Other clients: nc and socat ---------------------------------------------

class TestOtherClients(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def run_tool(self, command, stdin_data):
        """Run an external client that leaves when its input ends."""
        need(command[0])
        return subprocess.run(command, input=stdin_data.encode(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT).stdout.decode()

    def test_nc_and_two_python_clients_talk_to_each_other(self):
        bob = self.connect('bob')
        clients = []
        for name in ('py1', 'py2'):
            clients.append(ClientProcess(self.srv.port, '--name', name))
            self.addCleanup(lambda c=clients[-1]: c.proc.poll() is None and c.proc.kill())
            bob.expect(came(name))
        clients[0].send('hi all\n')
        clients[1].expect(r'^<py1> hi all$')
        out = self.run_tool(['nc', '-N', '127.0.0.1', str(self.srv.port)],
                            '/nick netcat\nhello from nc\n/who\n')
        self.assertIn('<py1> hi all', out)  # the history
        self.assertIn('-!- 4 online in #lobby: bob, netcat, py1, py2', out)
        for client in clients:
            client.expect(r'^<netcat> hello from nc$')
        clients[1].send('hi py1\n')
        clients[0].expect(r'^<py2> hi py1$')
        for client in clients:
            self.assertEqual(client.finish(), (0, ''))

    def test_nc_in_a_room(self):
        bob = self.connect('bob')
        bob.send('/join dev\n')
        bob.expect(r'^-!- You are in #dev$')
        out = self.run_tool(['nc', '-N', '127.0.0.1', str(self.srv.port)],
                            '/nick netcat\n/join #dev\nhello dev\n/rooms\n')
        self.assertIn('-!- You are in #dev', out)
        self.assertIn('-!-   #dev (2)', out)
        bob.expect(r'^<netcat> hello dev$')

    def test_socat_with_crlf_line_endings(self):
        bob = self.connect('bob')
        out = self.run_tool(['socat', '-t', '5', 'STDIO,crlf',
                             'TCP:127.0.0.1:%d' % self.srv.port],
                            '/nick socat\nhello from socat\n/quit\n')
        self.assertIn('-!- guest-2 is now known as socat', out)
        bob.expect(r'^<socat> hello from socat$')
        bob.expect(r'^-!- socat left \(quit\)$')


# --- The terminal client -----------------------------------------------------

class Screen:
    """Just enough of a terminal to see what a person would: text (wide
    characters take two cells), CR, LF, BEL, and the escape sequences the
    client uses.  SGR (colour) sequences are counted, then ignored."""

    def __init__(self, columns):
        self.columns = columns
        self.rows = [[]]
        self.row = self.col = 0
        self.bells = self.colours = 0
        self.answers = []  # what the terminal says back (cursor position reports)
        self.decoder = __import__('codecs').getincrementaldecoder('utf-8')()
        self.unfinished = ''  # an escape sequence cut off at the end of a read

    def feed(self, data):
        """What the client wrote, as a read gives it: an escape sequence may
        be split over two reads (the terminal cuts long writes)."""
        text = self.unfinished + self.decoder.decode(data)
        cut = re.search(r'\x1b(\[[0-9;]*)?$', text)
        self.unfinished, text = (text[cut.start():], text[:cut.start()]) if cut else ('', text)
        self.put(text)

    def put(self, text):
        i = 0
        while i < len(text):
            ch = text[i]
            match = re.match(r'\x1b\[([0-9;]*)([A-Za-z])', text[i:])
            if match:
                self.csi(match.group(1), match.group(2))
                i += match.end()
                continue
            if ch == '\r':
                self.col = 0
            elif ch == '\n':
                self.row += 1
                self.rows.extend([] for _ in range(self.row + 1 - len(self.rows)))
            elif ch == '\a':
                self.bells += 1
            else:
                width = chat.char_width(ch)
                if self.col + width > self.columns:
                    self.put('\r\n')
                cells = self.rows[self.row]
                cells.extend(' ' for _ in range(self.col + width - len(cells)))
                cells[self.col:self.col + width] = [ch] + [''] * (width - 1)
                self.col += width
            i += 1

    def csi(self, params, final):
        count = int(params or '1') if params.isdigit() else 1
        if final == 'K':
            del self.rows[self.row][self.col:]
        elif final == 'J':  # to the end of the screen
            del self.rows[self.row][self.col:]
            del self.rows[self.row + 1:]
        elif final == 'A':
            self.row = max(0, self.row - count)
        elif final == 'n' and params == '6':  # where is the cursor?
            self.answers.append('\x1b[%d;%dR' % (self.row + 1, self.col + 1))
        elif final == 'C':
            self.col = min(self.columns - 1, self.col + count)
        elif final == 'D':
            self.col = max(0, self.col - count)
        elif final == 'm':
            self.colours += params not in ('', '0')

    def narrow(self, columns):
        """The window gets narrower, and the terminal rewraps the row the
        cursor is on (as VTE, kitty and tmux do); the cursor moves with its
        character."""
        cells = self.rows[self.row]
        if len(cells) > columns:
            pieces = [cells[i:i + columns] for i in range(0, len(cells), columns)]
            self.rows[self.row:self.row + 1] = pieces
            self.row, self.col = self.row + self.col // columns, self.col % columns
        self.columns = columns

    def line(self, row=-1):
        return ''.join(self.rows[row]).rstrip()

    def text(self):
        return '\n'.join(''.join(cells).rstrip() for cells in self.rows)


# Run the client as the session leader of a new terminal, so that Ctrl-C
# and window-size changes reach it as signals.
TTY_WRAPPER = ('import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); '
               'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')


def set_window_size(fd, rows, columns):
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', rows, columns, 0, 0))


class PtySession:
    """Runs the client under a new pseudo-terminal and reads its screen."""
    COLUMNS = 60

    def spawn(self, *args, env=None, command=None):
        """The client under a new pseudo-terminal; its output feeds self.screen."""
        import pty
        import termios
        self.master, slave = pty.openpty()
        self.addCleanup(os.close, self.master)
        set_window_size(slave, 24, self.COLUMNS)
        self.before = termios.tcgetattr(slave)
        self.slave = slave
        self.addCleanup(os.close, slave)
        environment = dict(os.environ)
        environment.pop('NO_COLOR', None)
        environment.update(env or {})
        for name in [name for name, value in environment.items() if value is None]:
            del environment[name]  # env={'NAME': None} unsets NAME
        self.proc = subprocess.Popen(
            command or [sys.executable, '-c', TTY_WRAPPER, CHAT, 'client', '127.0.0.1',
                        str(self.srv.port)] + list(args),
            stdin=slave, stdout=slave, stderr=slave, env=environment, start_new_session=True)
        self.addCleanup(self.reap, self.proc)
        self.screen = Screen(self.COLUMNS)

    @staticmethod
    def reap(proc):
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)

    def read_until(self, predicate, what):
        """Feed the screen until predicate(screen) holds; fail at the deadline."""
        deadline = time.monotonic() + TIMEOUT
        while not predicate(self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError('screen never showed %s:\n%s' % (what, self.screen.text()))
            import select
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    self.screen.feed(os.read(self.master, 65536))
                except OSError:  # the client is gone: nothing more will come
                    raise AssertionError('client exited before %s:\n%s'
                                         % (what, self.screen.text()))
                while self.screen.answers:  # the terminal answers its questions
                    self.type(self.screen.answers.pop(0))

    def type(self, keys):
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def prompt_line(self):
        return self.screen.line()

    def wait_exit(self):
        """Wait for the client to exit, reading its screen meanwhile (as a
        terminal would: a full one would block its last writes)."""
        import select
        deadline = time.monotonic() + TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.screen.feed(os.read(self.master, 65536))
                except OSError:
                    break  # no process holds the terminal any more
        self.proc.wait(max(0.0, deadline - time.monotonic()))
        import termios
        self.assertEqual(termios.tcgetattr(self.slave), self.before,
                         'the terminal was not restored')
        return self.proc.returncode


@unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
class TestTerminalClientAgainstAFakeServer(PtySession, unittest.TestCase):

    def named_client(self, name):
        """The client started as name against a FakeServer, once it asked
        for the name: the server's end, and what the client sent."""
        fake = FakeServer()
        self.addCleanup(fake.close)
        self.srv = fake  # spawn() connects to self.srv.port
        self.spawn('--name', name)
        sock = fake.accept()
        self.addCleanup(sock.close)
        received = b''
        while not received.endswith(('/nick %s\n' % name).encode()):
            received += sock.recv(100)
        return sock, received

    def test_a_line_typed_before_the_welcome_is_shown_with_our_name(self):
        sock, received = self.named_client('early')
        self.type('hello before\r')
        while not received.endswith(b'hello before\n'):
            received += sock.recv(100)
        sock.sendall(b'-!- Welcome, early! Type /help\n')
        self.read_until(lambda s: '<early> hello before' in s.text(), 'our line, named')
        self.assertNotIn('None', self.screen.text())

    def test_the_lines_of_one_message_go_in_one_send(self):
        # The server handles what one read brings in one turn; the kernel
        # counts the segments that came (tcp_info's data_segs_in).
        sock, received = self.named_client('multi')
        sock.sendall(b'-!- Welcome, multi! Type /help\n')
        self.read_until(lambda s: s.line().startswith('>'), 'the prompt')
        segments_before = data_segments_in(sock)
        self.type('one\x1b\rtwo\x1b\rthree\r')  # Alt-Enter twice, then Enter
        while not received.endswith(b'one\ntwo\nthree\n'):
            received += sock.recv(100)
        self.assertEqual(data_segments_in(sock) - segments_before, 1)


class TestTerminalClient(PtySession, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def join(self, name='tty', *args, **kw):
        """Start the client as name and wait for its prompt; a peer watching."""
        watcher = self.connect('watcher')
        self.spawn('--name', name, *args, **kw)
        self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the prompt')
        watcher.expect(came(name))
        return watcher

    def test_typed_text_stays_intact_while_messages_arrive(self):
        watcher = self.join()
        self.type('hello wor')
        self.read_until(lambda s: s.line() == PROMPT + 'hello wor', 'the typed text')
        for i in range(20):
            watcher.send('message %d\n' % i)
        # The typed text is drawn again after the messages, perhaps in a later read.
        self.read_until(lambda s: 'message 19' in s.text() and s.line() == PROMPT + 'hello wor'
                        and s.col == len(PROMPT + 'hello wor'), 'the messages, then the text')
        shown = [line for line in self.screen.text().split('\n') if 'message' in line]
        self.assertEqual(len(shown), 20)
        for i, line in enumerate(shown):
            self.assertRegex(line, r'^\d\d:\d\d <watcher> message %d$' % i)
        self.type('ld\r')
        watcher.expect(r'^<tty> hello world$')
        self.read_until(lambda s: '<tty> hello world' in s.text(), 'our own line')

    def test_editing_keys(self):
        watcher = self.join()
        cases = [
            ('abc\x1b[D\x1b[DX', 'aXbc'),                 # Left
            ('abc\x01S\x05E', 'SabcE'),                   # Ctrl-A, Ctrl-E
            ('abc\x1b[H\x1b[3~\x1b[F!', 'bc!'),           # Home, Delete, End
            ('abc\x1bOH>\x1bOF<', '>abc<'),               # SS3 Home/End
            ('abcd\x7f\x08', 'ab'),                       # Backspace (DEL and ^H)
            ('one two\x1b[D\x1b[D\x0b', 'one t'),         # Ctrl-K
            ('one two\x1b[D\x1b[D\x15', 'wo'),            # Ctrl-U
            ('one two  \x17', 'one '),                    # Ctrl-W
            ('x\x1b[15~\x1b[1;5Cy\x1bz\x07\tz', 'xyz'),   # unknown keys ignored
            ('p\x1b\x1b[Aq\x1b[[Ar\x1b[[Es', 'pqrs'),       # PuTTY Alt-Up, Linux F1, F5
            ('\x1b[A', 'pqrs'),                          # Up recalls the last line
            ('new\x1b[A\x1b[A\x1b[B\x1b[B', 'new'),       # Down returns to the draft
            ('\u1112\u1161\u11ab\u1100\u1173\u11af\x1b[D!', '\ud55c!\uae00'),  # NFD Hangul
        ]
        for keys, sent in cases:
            self.type(keys + '\r')
            watcher.expect(r'^<tty> %s$' % re.escape(sent))

    def test_the_keys_readline_users_reach_for(self):
        watcher = self.join()
        for sent in ('hello world', 'second line', 'third'):  # lines to search
            self.type(sent + '\r')
            watcher.expect(r'^<tty> %s$' % sent)
        cases = [
            ('one two three\x1b[1;5D\x1b[1;5DX', 'one Xtwo three'),  # Ctrl-Left
            ('one two\x1bb\x1bbY\x1bfZ', 'YoneZ two'),            # Alt-B, Alt-F
            ('one\x1b[1;5D\x1b[1;5Cs', 'ones'),                   # Ctrl-Right
            ('one two\x1b\x7fX', 'one X'),                        # Alt-Backspace
            ('one two\x1b[1;5D\x1b[1;5D\x1bd', ' two'),           # Alt-D
            ('abc\x14', 'acb'),                                   # Ctrl-T at the end
            ('ab\x02\x14', 'ba'),                                 # Ctrl-T inside
            ('\x12sec', 'second line'),                           # Ctrl-R, then Enter
            ('\x12d\x12', 'third'),                               # Ctrl-R again: older
            ('\x12xyz\x07q', 'q'),                                # Ctrl-G gives up
        ]
        for keys, sent in cases:
            self.type(keys + '\r')
            watcher.expect(r'^<tty> %s$' % re.escape(sent))

    def test_alt_enter_makes_a_message_of_several_lines(self):
        watcher = self.join()
        self.type('line one\x1b\rline two')
        self.read_until(lambda s: s.line() == PROMPT + 'line one%sline two' % chat.LINE_BREAK_SHOWN,
                        'the line break shown')
        self.type('\x1b[27;2;13~third\r')  # Shift-Enter, as xterm tells it apart
        watcher.expect(r'^<tty> line one$')
        self.assertEqual(watcher.line(), '<tty> line two')
        self.assertEqual(watcher.line(), '<tty> third')

    def test_a_line_too_long_for_the_server_stays_to_be_cut(self):
        watcher = self.join()
        self.type('x' * (chat.MAX_LINE_BYTES + 4) + '\r')
        why = '!!! line too long (%d bytes; at most %d): not sent' % (
            chat.MAX_LINE_BYTES + 4, chat.MAX_LINE_BYTES)
        # The line is drawn again after the reason, perhaps in a later read.
        self.read_until(lambda s: why in s.text() and s.line().endswith('xxx'),
                        'why, and the line still there to be cut')
        self.type('\x15fits\r')
        before, _ = watcher.expect(r'^<tty> fits$')
        self.assertEqual(before, [])  # the long one never went

    def test_the_limit_is_the_servers_own(self):
        self.srv.stop()
        self.srv = ServerThread(rate=0, max_line=100)
        self.addCleanup(self.srv.stop)
        watcher = self.join()
        self.read_until(lambda s: '-!- lines here hold at most 100 bytes' in s.text(),
                        'the limit, said at join')
        self.type('\x1b\r'.join(['y' * 100, '한' * 34]) + '\r')  # 102 bytes on the second
        self.read_until(lambda s: '!!! line too long (102 bytes; at most 100): not sent'
                        in s.text(), 'why')
        self.type('\x08\r')  # one Hangul syllable fewer: 99 bytes
        watcher.expect(r'^<tty> y{100}$')
        self.assertEqual(watcher.line(), '<tty> ' + '한' * 33)

    def test_resizing_redraws_the_line_where_it_belongs(self):
        self.join()
        text = 'abcdefghij' * 5  # 50 columns of the 60
        self.type(text)
        self.read_until(lambda s: s.line() == PROMPT + text, 'the typed text')
        rows = len(self.screen.rows)
        self.screen.narrow(30)  # the terminal rewraps the line onto two rows...
        set_window_size(self.slave, 24, 30)  # ...and says so
        self.read_until(lambda s: len(s.rows) == rows and s.line().endswith('hij'),
                        'one line again, not a stale copy above it')
        self.assertLessEqual(chat.text_width(self.screen.line()), 30)  # scrolled sideways
        self.screen.columns = 60
        set_window_size(self.slave, 24, 60)  # wider again: all of it shows, not scrolled
        self.read_until(lambda s: s.line() == PROMPT + text, 'the whole line again')

    def test_wide_characters_split_across_writes(self):
        watcher = self.join()
        for byte in '한글😀'.encode():
            self.type(bytes([byte]))
            time.sleep(0.002)  # separate reads, not a condition to wait for
        self.read_until(lambda s: s.line() == PROMPT + '한글😀', 'the wide characters')
        self.assertEqual(self.screen.col, len(PROMPT) + 6)
        self.type('\x1b[D')
        self.read_until(lambda s: s.col == len(PROMPT) + 4, 'the cursor over the emoji')
        self.type('\x1b[D\x1b[DX\r')  # to the start, then type before it
        watcher.expect(r'^<tty> X한글😀$')

    def test_a_combining_mark_moves_with_its_letter(self):
        watcher = self.join()
        self.type('cq\u0301x\x1b[D\x1b[D\x7f\r')  # back over "x" and "q́", delete "c"
        watcher.expect('^<tty> q\u0301x$')  # (no precomposed q́: NFC keeps the mark)

    def test_a_line_wider_than_the_terminal_scrolls(self):
        watcher = self.join()
        text = ''.join('%d' % (i % 10) for i in range(150))
        self.type(text)
        self.read_until(lambda s: s.line().endswith('789'), 'the end of the line')
        self.assertLessEqual(len(self.prompt_line()), self.COLUMNS)
        self.type('\x01')
        self.read_until(lambda s: s.line().startswith(PROMPT + '0123') and s.col == len(PROMPT),
                        'the start of the line, and the cursor there')
        self.type('\r')
        watcher.expect(r'^<tty> %s$' % text)

    def test_ctrl_l_redraws(self):
        self.join()
        self.type('abc')
        self.read_until(lambda s: s.line() == PROMPT + 'abc', 'the typed text')
        self.screen.feed(b'\r\x1b[K')  # forget it, so only a redraw brings it back
        self.type('\x0c')
        self.read_until(lambda s: s.line() == PROMPT + 'abc', 'the line redrawn')

    def test_ctrl_l_redraws_a_line_scrolled_sideways(self):
        self.join()
        text = ''.join('%d' % (i % 10) for i in range(100))
        self.type(text)
        self.read_until(lambda s: s.line().endswith('789'), 'the end of the line')
        shown = self.screen.line()
        self.screen.feed(b'\r\x1b[K')
        self.type('\x0c')
        self.read_until(lambda s: s.line() == shown and s.col == len(shown),
                        'the same part of the line redrawn, the cursor at its end')

    def test_a_resize_redraws(self):
        self.join()
        self.type('abc')
        self.read_until(lambda s: s.line() == PROMPT + 'abc', 'the typed text')
        self.screen.feed(b'\r\x1b[K')  # forget it, so only a redraw brings it back
        set_window_size(self.slave, 24, 40)  # the kernel sends SIGWINCH
        self.read_until(lambda s: s.line() == PROMPT + 'abc', 'the line redrawn')

    def test_ctrl_c_restores_the_terminal(self):
        self.join()
        self.type('half typed\x03')
        self.assertEqual(self.wait_exit(), 0)

    def test_ctrl_d_on_an_empty_line_leaves(self):
        watcher = self.join()
        self.type('x\x04')  # not empty: Ctrl-D deletes (nothing) instead
        self.type('\x7f\x04')
        watcher.expect(r'^-!- tty left \(quit\)$')
        self.assertEqual(self.wait_exit(), 0)

    def test_sigterm_restores_the_terminal(self):
        self.join()
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.wait_exit(), 0)

    def test_the_server_going_away_restores_the_terminal(self):
        self.join()
        self.srv.stop()
        self.read_until(lambda s: 'server closed the connection' in s.text(), 'why')
        self.read_until(lambda s: '(reconnecting…)' in s.line(), 'it tries to come back')
        self.type('\x03')  # Ctrl-C while cut off: leave
        self.assertEqual(self.wait_exit(), 0)

    def test_quit_command_restores_the_terminal(self):
        self.join()
        self.type('/quit bye\r')
        self.assertEqual(self.wait_exit(), 0)

    def test_colours_and_a_bell_when_named(self):
        watcher = self.join()
        watcher.send('hey TTY, look\n')
        self.read_until(lambda s: 'look' in s.text(), 'the mention')
        self.assertGreater(self.screen.colours, 0)
        self.assertEqual(self.screen.bells, 1)
        watcher.send('nothing for you\n')
        self.read_until(lambda s: 'nothing for you' in s.text(), 'the line')
        self.assertEqual(self.screen.bells, 1)

    def test_no_color_means_no_colour(self):
        for args, env in (((), {'NO_COLOR': '1'}), (('--no-color',), None)):
            watcher = self.connect('w%d' % len(self.conns))
            self.spawn('--name', 'plain', *args, env=env)
            self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the prompt')
            watcher.expect(came('plain'))  # named: the message mentions it
            watcher.send('hi plain, from %s\n' % watcher.name)
            self.read_until(lambda s: 'from ' + watcher.name in s.text(), 'the message')
            self.assertEqual(self.screen.colours, 0)
            self.assertEqual(self.screen.bells, 1)  # a bell is not a colour
            self.type('/quit\r')
            self.assertEqual(self.wait_exit(), 0)

    def test_escape_sequences_from_the_network_are_removed(self):
        watcher = self.join()
        watcher.send('\x1b]0;evil title\x07\x1b[2J\x1b[31mred\n')
        self.read_until(lambda s: 'red' in s.text(), 'the message')
        raw = []
        self.screen.feed = lambda data, feed=self.screen.feed: raw.append(data) or feed(data)
        watcher.send('more\n')
        self.read_until(lambda s: 'more' in s.text(), 'the next message')
        self.assertNotIn(b'\x1b]', b''.join(raw))

    def test_wrapped_lines_never_start_at_column_zero(self):
        watcher = self.join()
        watcher.send('x' * 150 + '\n')
        self.read_until(lambda s: 'xxx' in s.text() and s.line().startswith(PROMPT.rstrip()),
                        'the long line')
        rows = [row for row in self.screen.text().split('\n') if 'x' in row]
        self.assertEqual(len(rows), 3)
        self.assertRegex(rows[0], r'^\d\d:\d\d <watcher> x+$')
        for row in rows[1:]:
            self.assertTrue(row.startswith(chat.WRAPPED_INDENT + 'x'), repr(row))

    def test_a_prompt_wider_than_the_terminal_is_cut(self):
        self.COLUMNS = 40
        room = '\ud55c' * 24  # 48 columns of Hangul, and the prompt shows the room
        self.connect('watcher')
        self.spawn('--room', room, env={'COLUMNS': '200'})  # a stale COLUMNS: not believed
        self.read_until(lambda s: s.line().endswith('\u2026>'), 'the cut prompt')
        rows_before = len(self.screen.rows)
        self.type('abc' + 'd' * 60)
        self.read_until(lambda s: s.line().endswith('dd'), 'the typed text')
        self.assertEqual(len(self.screen.rows), rows_before)  # redrawn in place, not repeated
        self.assertLessEqual(chat.text_width(self.screen.line()), 40)

    def test_room_in_the_prompt_and_tab_completes_names_and_commands(self):
        watcher = self.connect('watcher')
        watcher.send('/join dev\n')
        watcher.expect(r'^-!- You are in #dev$')
        self.spawn('--name', 'tty', '--room', 'dev')
        self.read_until(lambda s: s.line().startswith('#dev>'), 'the room in the prompt')
        watcher.expect(came('tty'))
        self.type('/jo\t')
        self.read_until(lambda s: s.line() == '#dev> /join', 'a command completed')
        self.type('\x15wat\t')
        self.read_until(lambda s: s.line() == '#dev> watcher', 'a name completed')
        self.type('hello\r')
        watcher.expect(r'^<tty> watcher hello$')
        self.type('/part\r')
        self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the lobby')

    def test_the_stdin_thread_works_with_the_editor(self):
        watcher = self.join(env={'CHAT_STDIN_THREAD': '1'})
        self.type('threaded\r')
        watcher.expect(r'^<tty> threaded$')
        self.type('\x04')
        self.assertEqual(self.wait_exit(), 0)

    def test_ctrl_z_suspends_with_the_terminal_restored_and_fg_resumes(self):
        import termios
        watcher = self.connect('watcher')
        self.spawn(command=[need('bash'), '--norc', '--noprofile', '--noediting', '-i'],
                   env={'PS1': '$ ', 'TERM': 'dumb'})
        self.type('%s %s client 127.0.0.1 %d --name tty\n'
                  % (sys.executable, CHAT, self.srv.port))
        watcher.expect(came('tty'))
        self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the prompt')
        self.type('half')
        self.read_until(lambda s: s.line() == PROMPT + 'half', 'the typed text')
        self.type('\x1a')
        self.read_until(lambda s: 'Stopped' in s.text(), 'the shell taking over')
        attrs = termios.tcgetattr(self.slave)
        self.assertTrue(attrs[3] & termios.ICANON and attrs[3] & termios.ECHO)
        self.type('fg\n')
        self.read_until(lambda s: s.line() == PROMPT + 'half', 'the line redrawn')
        self.type(' done\r')
        watcher.expect(r'^<tty> half done$')
        self.type('\x04')
        watcher.expect(r'^-!- tty left \(quit\)$')
        self.type('exit\n')
        self.proc.wait(TIMEOUT)


@unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
class TestReplayedTimes(PtySession, DataTests, unittest.TestCase):

    def test_the_client_shows_when_a_replayed_line_was_said(self):
        DataTests.setUp(self)
        with open(self.log_path, 'wb') as log:
            log.write(records('<old> from long ago'))
        self.srv = self.serve()
        self.spawn('--name', 'newt', env={'TZ': 'UTC'})
        self.read_until(lambda s: '<old> from long ago' in s.text(), 'the replayed line')
        self.assertIn('2020-01-02 03:04 <old> from long ago', self.screen.text())


@unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
class TestClientComesBack(PtySession, ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def spawn_at(self, port, *args):
        self.spawn(command=[sys.executable, '-c', TTY_WRAPPER, CHAT, 'client', '127.0.0.1',
                            str(port)] + list(args))

    def test_a_lost_connection_resumes_with_the_missed_lines_once(self):
        proxy = CuttableProxy(self.srv.port)  # a network that drops
        self.addCleanup(proxy.stop)
        bob = self.connect('bob')
        self.spawn_at(proxy.port, '--name', 'tess', '--room', 'dev')
        bob.send('/join dev\n')
        bob.expect(r'^-!- \d+ online in #dev: ')
        bob.send('one\n')
        self.read_until(lambda s: '<bob> one' in s.text(), 'a line')
        proxy.cut()
        self.read_until(lambda s: '(reconnecting…) #dev>' in s.line(), 'the reconnecting state')
        bob.send('two, while tess is away\n')
        self.type('typed while away\r')
        self.type('half a line')
        bob.expect(r'^<tess> typed while away$')  # sent once back, after the resume
        self.read_until(lambda s: '<bob> two, while tess is away' in s.text(), 'the missed line')
        self.read_until(lambda s: s.line() == '#dev> half a line', 'the typed text, kept')
        text = self.screen.text()
        self.assertEqual((text.count('<bob> one'), text.count('<bob> two')), (1, 1))
        self.assertIn('chat.py: connection lost: ', text)
        self.type('\r')
        bob.expect(r'^<tess> half a line$')
        self.srv.wait_log(r'tess resumed from ')

    def test_after_a_server_restart_it_comes_back_by_name_and_room(self):
        server = ServerProcess('--rate', '0')
        self.addCleanup(lambda: server.stop())
        self.spawn_at(server.port, '--name', 'tess', '--room', 'dev')
        self.read_until(lambda s: s.line() == '#dev>', 'in #dev')
        port = server.port
        server.finish()
        self.read_until(lambda s: '(reconnecting…) #dev>' in s.line(), 'the reconnecting state')
        server = ServerProcess('--rate', '0', port=port)
        watcher = Conn(port)
        self.addCleanup(watcher.close)
        watcher.send('/join dev\n')  # before tess is back, or after
        watcher.expect(here_or_came('#dev', 'tess'))  # its token died with the server:
        # in as new, by name
        self.read_until(lambda s: s.line() == '#dev>', 'back in #dev')

    def test_with_data_it_resumes_across_a_restart_with_the_lines_it_missed(self):
        data = tempfile.mkdtemp(prefix='chat-data-')
        self.addCleanup(shutil.rmtree, data)
        server = ServerProcess('--rate', '0', '--data', data)
        self.addCleanup(lambda: server.stop())
        port = server.port
        proxy = CuttableProxy(port)  # the client's network, which the test can take down
        self.addCleanup(proxy.stop)
        bob = Conn(port)
        self.addCleanup(bob.close)
        bob.send('/nick bob\n/join dev\n')
        bob.name = 'bob'
        self.spawn_at(proxy.port, '--name', 'tess', '--room', 'dev')
        bob.expect(came('tess'))
        bob.send('before\n')
        self.read_until(lambda s: '<bob> before' in s.text(), 'a line')
        proxy.refusing = True
        proxy.cut()
        self.read_until(lambda s: '(reconnecting…) #dev>' in s.line(), 'the reconnecting state')
        self.type('half a line')
        bob.expect(r'^-!- tess lost the connection$')
        bob.send('missed before the restart\n')
        roundtrip(bob)
        server.finish(signal.SIGKILL)
        server = ServerProcess('--rate', '0', '--data', data, port=port)
        cy = Conn(port)
        self.addCleanup(cy.close)
        cy.send('/nick cy\n/join dev\nmissed after the restart\n')
        cy.name = 'cy'
        roundtrip(cy)
        proxy.refusing = False
        self.read_until(lambda s: '<cy> missed after the restart' in s.text(), 'the missed lines')
        self.read_until(lambda s: s.line() == '#dev> half a line', 'the typed text, kept')
        text = self.screen.text()
        self.assertEqual([text.count(line) for line in (
            '<bob> before', '<bob> missed before the restart', '<cy> missed after the restart')],
            [1, 1, 1])
        self.assertIn('You are back as tess in #dev: 3 lines you missed', text)
        server.wait_log(r'tess resumed from ')
        self.type('\r')
        cy.expect(r'^<tess> half a line$')

    def test_a_kick_is_not_undone_by_reconnecting(self):
        server = ServerProcess('--rate', '0', env=dict(os.environ, CHAT_OP_PASSWORD='op'))
        self.addCleanup(server.stop)
        op = Conn(server.port)
        self.addCleanup(op.close)
        op.send('/op op\n')
        op.expect(r'is now an operator')
        self.spawn_at(server.port, '--name', 'tess')
        op.expect(came('tess'))
        op.send('/kick tess enough\n')
        self.assertEqual(self.wait_exit(), 1)
        self.assertIn('you were kicked by', self.screen.text())


@unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
class TestClientNamePassword(PtySession, DataTests, unittest.TestCase):
    """The client's --name for a registered name: CHAT_NAME_PASSWORD, or a
    prompt without echo on a terminal."""

    def setUp(self):
        DataTests.setUp(self)
        self.srv = self.serve()
        owner = self.join(self.srv, 'tess')
        owner.send('/register correct horse\n')
        owner.expect(r'^-!- The name tess is yours')
        owner.send('/quit\n')
        owner.expect_closed()

    def test_piped_it_takes_the_password_from_the_environment(self):
        client = ClientProcess(self.srv.port, '--name', 'tess',
                               env=dict(os.environ, CHAT_NAME_PASSWORD='correct horse'))
        client.expect(r'^-!- guest-\d+ is now known as tess$')
        client.send('/quit\n')
        self.assertEqual(client.finish()[0], 0)
        refused = ClientProcess(self.srv.port, '--name', 'tess',
                                env=dict(os.environ, CHAT_NAME_PASSWORD=''))
        status, err = refused.finish()
        self.assertEqual((status, err.strip()), (1, 'chat.py: error: CHAT_NAME_PASSWORD is set '
                                                    'but empty'))
        env = dict(os.environ)
        env.pop('CHAT_NAME_PASSWORD', None)
        refused = ClientProcess(self.srv.port, '--name', 'tess', env=env)
        status, err = refused.finish()
        self.assertEqual(status, 1)
        self.assertIn('cannot use the name tess: it is registered; give its password: /nick '
                      'tess PASSWORD (set CHAT_NAME_PASSWORD)', err)
        self.assertNotIn('Traceback', err)

    def test_on_a_terminal_it_asks_without_echo(self):
        self.spawn('--name', 'tess', env={'CHAT_NAME_PASSWORD': None})
        self.read_until(lambda s: 'Password for the name tess:' in s.text(), 'the prompt')
        self.type('wrong guess\r')
        self.read_until(lambda s: 'wrong password for the name tess (2 tries left)' in s.text(),
                        'the wrong password refused')
        self.read_until(lambda s: s.text().count('Password for the name tess:') == 2,
                        'the prompt again')
        self.type('correct horse\r')
        self.read_until(lambda s: 'is now known as tess' in s.text(), 'the name')
        self.assertNotIn('correct horse', self.screen.text())
        self.assertNotIn('wrong guess', self.screen.text())
        self.type('hello\r')
        self.type('\x04')  # Ctrl-D: leave
        self.assertEqual(self.wait_exit(), 0)


class TestTelnet(PtySession, ServerTestCase):
    """The real telnet under a pseudo-terminal."""
    SERVER_OPTIONS = {'rate': 0}

    def test_telnet_survives_ctrl_c_and_nothing_of_its_protocol_is_said(self):
        watcher = self.connect('watcher')
        self.spawn(command=[need('telnet'), '127.0.0.1', str(self.srv.port)])
        self.read_until(lambda s: chat.ENTER_TO_JOIN in s.text(), 'the knock')
        self.type('/nick tel\r')  # its first line lets it in, and is handled
        watcher.expect(came('tel'))
        # Ctrl-C (and in some telnets, a byte of Hangul: 0x83 is Ctrl-C with
        # the high bit set, and U+AC03 has it): telnet sends IAC IP IAC DO
        # TIMING-MARK, then discards what it receives until the answer,
        # WILL TIMING-MARK, comes.
        self.type('\x03\uac03\r')
        watcher.expect(r'^<tel> \ufffd$')  # what telnet left of it: the server has read it
        watcher.send('after ctrl-c\n')
        self.read_until(lambda s: '<watcher> after ctrl-c' in s.text(), 'the room, still')
        self.type('still talking\r')
        before, _ = watcher.expect(r'^<tel> still talking$')
        self.assertEqual(before, [])  # no bytes of telnet's said to anyone

    def test_telnet_answers_go_only_to_whoever_speaks_telnet(self):
        watcher = self.connect('watcher')
        raw = Conn(self.srv.port)
        self.addCleanup(raw.close)
        raw.expect(r'^-!- \d+ online')
        raw.send(b'hi\xff\xfd\x06\xff\xfb\x01 th\xff')  # DO TM, WILL ECHO, and half an IAC
        raw.send(b'\xf4ere\n')  # ...IP, in the next read
        watcher.expect(r'^<guest-2> hi there$')
        data = b''
        while not data.endswith(b'\xff\xfe\x01'):  # WILL TIMING-MARK, DONT ECHO
            data += raw.sock.recv(100)
        self.assertEqual(data, b'\xff\xfb\x06\xff\xfe\x01')
        self.assertEqual(self.sync(watcher), [])  # and nothing to anyone else

    def test_options_asked_for_are_refused_and_subnegotiations_removed(self):
        watcher = self.connect('watcher')
        raw = Conn(self.srv.port)
        self.addCleanup(raw.close)
        raw.expect(r'^-!- \d+ online')
        raw.send(b'\xff\xfd\x18a\xff\xfa\x1f\x00')  # DO TERMINAL-TYPE; half a NAWS report
        raw.send(b'\x50\x00\x18\xff\xf0b\n')      # its other half, ended by IAC SE
        watcher.expect(r'^<guest-2> ab$')
        data = b''
        while len(data) < 3:
            data += raw.sock.recv(100)
        self.assertEqual(data, b'\xff\xfc\x18')  # WONT TERMINAL-TYPE


# --- Who gets in: TLS, passwords, address rules, operators ----------------------

CERTS = {}


def certificate():
    """(cert, key, fingerprint) of a self-signed certificate for "localhost"
    (and not for 127.0.0.1), made once by the openssl command."""
    if not CERTS:
        need('openssl')
        folder = tempfile.mkdtemp(prefix='chat-test-')
        cert, key = os.path.join(folder, 'cert.pem'), os.path.join(folder, 'key.pem')
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                        'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj',
                        '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost',
                        '-keyout', key, '-out', cert], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        printed = subprocess.run(['openssl', 'x509', '-in', cert, '-noout', '-fingerprint',
                                  '-sha256'], stdout=subprocess.PIPE, check=True,
                                 universal_newlines=True).stdout
        CERTS.update(cert=cert, key=key, fingerprint=printed.strip().split('=')[1])
    return CERTS['cert'], CERTS['key'], CERTS['fingerprint']


class TlsConn(Conn):
    """A raw TLS peer (like openssl s_client), trusting any certificate."""

    def __init__(self, port, rcvbuf=None, hello=True):
        Conn.__init__(self, port, rcvbuf=rcvbuf, hello=False)
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)
        if hello:
            self.send(b'\n')


def link_figures(server):
    """A linked server's chat_link_* figures from its /metrics, by their
    names' ends: {'up': 1, 'servers': 2}."""
    _, _, body = response_parts(http_get(server.port, 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n'))
    return {name: int(value) for name, value in
            re.findall(r'^chat_link_(\w+) (\d+)$', body.decode(), re.M)}


def patch_constant(test, name, value):
    original = getattr(chat, name)
    setattr(chat, name, value)
    test.addCleanup(setattr, chat, name, original)


class TestTls(ServerTestCase):
    SERVER_OPTIONS = {'rate': 0}

    def setUp(self):
        cert, key, self.fingerprint = certificate()
        self.SERVER_OPTIONS = dict(self.SERVER_OPTIONS, tls=chat.server_tls(cert, key)[0])
        ServerTestCase.setUp(self)

    def tls_peer(self, name, **kw):
        conn = TlsConn(self.srv.port, **kw)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- Welcome, ')
        conn.send('/nick %s\n' % name)
        conn.expect(r'is now known as %s$' % name)
        return conn

    def client(self, *args, **kw):
        return run_chat('client', kw.pop('host', '127.0.0.1'), str(self.srv.port), *args, **kw)

    def test_a_reset_tls_connection_resumes(self):
        ann = TlsConn(self.srv.port)
        self.addCleanup(ann.close)
        token = ann.expect(r'^-!- To resume after a lost connection: /resume (\S+)$')[1].group(1)
        bob = self.tls_peer('bob')
        ann.expect(came('bob'))  # one line, or a guest's joining and its rename
        seen = len(SessionPeers.since_token(ann))
        ann.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        ann.sock.close()  # no close_notify: a reset, as a network that fails
        bob.expect(r'^-!- guest-1 lost the connection$')
        back = TlsConn(self.srv.port, hello=False)
        self.addCleanup(back.close)
        back.send('/resume %s %d\n' % (token, seen))
        back.expect(r'^-!- You are back as guest-1 in #lobby: 0 lines you missed$')

    def test_the_fingerprint_printed_is_what_openssl_prints(self):
        cert, key, printed = certificate()
        self.assertEqual(chat.server_tls(cert, key)[1], printed)
        self.assertEqual(chat.fingerprint_arg('sha256 Fingerprint=' + printed), printed)
        self.assertEqual(chat.fingerprint_arg(printed.replace(':', '').lower()), printed)

    def test_a_plain_text_client_is_told_and_closed(self):
        watcher = self.tls_peer('watcher')
        plain = Conn(self.srv.port)
        self.addCleanup(plain.close)
        plain.send('hello\n')
        self.assertEqual(plain.expect_closed(), ['!!! this server speaks TLS: join with '
                                                 'python3 chat.py client HOST --tls'])
        self.srv.wait_log(r'refused 127\.0\.0\.1:\d+: not TLS')
        self.assertEqual(self.sync(watcher), [])  # the room saw nothing of it

    def test_the_right_fingerprint_chats(self):
        bob = self.tls_peer('bob')
        result = self.client('--name', 'pinned', '--tls-fingerprint', self.fingerprint,
                             stdin_data='over TLS\n')
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        bob.expect(r'^<pinned> over TLS$')

    def test_a_wrong_fingerprint_is_refused_before_anything_is_sent(self):
        wrong = 'FF' + self.fingerprint[2:] if not self.fingerprint.startswith('FF') else \
            '00' + self.fingerprint[2:]
        result = self.client('--name', 'fooled', '--tls-fingerprint', wrong,
                             stdin_data='secret\n')
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"^chat\.py: error: the server's certificate is "
                         r"[0-9A-F:]{95}, not the %s given: refusing to talk to it\n$" % wrong)
        watcher = self.tls_peer('watcher')
        self.sync(watcher)
        self.assertFalse([l for l in self.srv.logs if 'fooled' in l])

    def test_a_ca_file_verifies_the_host_name(self):
        cert, _, _ = certificate()
        bob = self.tls_peer('bob')
        result = self.client('--cafile', cert, '--name', 'verified', stdin_data='hi\n',
                             host='localhost')
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        bob.expect(r'^<verified> hi$')
        result = self.client('--cafile', cert, stdin_data='hi\n')  # 127.0.0.1: not its name
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r'^chat\.py: error: TLS with 127\.0\.0\.1 failed: .*'
                         r'(IP address mismatch|match)')

    def test_system_cas_refuse_a_self_signed_certificate(self):
        result = self.client('--tls', stdin_data='hi\n', host='localhost')
        self.assertEqual(result.returncode, 1)  # piped, it cannot ask: a new certificate is refused
        self.assertRegex(result.stderr, r'^chat\.py: error: the certificate of localhost:\d+ is '
                         r'new to this computer \(SHA-256 %s\): check it against the server\'s '
                         r'banner, then run again with --tls-fingerprint %s\n$'
                         % (self.fingerprint, self.fingerprint))

    def test_a_stalled_handshake_blocks_no_one_and_is_dropped(self):
        patch_constant(self, 'TLS_HANDSHAKE_SEC', 0.5)
        staller = Conn(self.srv.port, hello=False)
        self.addCleanup(staller.close)
        staller.send(b'\x16\x03\x01')  # the start of a ClientHello, then nothing
        alice, bob = self.tls_peer('alice'), self.tls_peer('bob')
        alice.send('while it stalls\n')
        bob.expect(r'^<alice> while it stalls$')
        self.assertEqual(staller.expect_closed(), [])
        self.srv.wait_log(r'dropped 127\.0\.0\.1:\d+: no TLS handshake in 0 s')

    def test_input_left_inside_tls_is_still_read(self):
        # Reads smaller than a TLS record leave decrypted bytes in the SSL
        # object, where no socket event announces them.
        patch_constant(self, 'READ_CHUNK_BYTES', 1000)
        alice, bob = self.tls_peer('alice'), self.tls_peer('bob')
        alice.send('%s\n' % ('z' * 4000))
        self.assertEqual(bob.line(), '<alice> ' + 'z' * 4000)

    def test_input_left_inside_tls_while_paused_is_still_read(self):
        # Flood control pauses alice with most of one TLS record still in
        # her SSL object: when she resumes, no socket event will say so.
        patch_constant(self, 'READ_CHUNK_BYTES', 1000)
        self.srv.server.rate, self.srv.server.burst = 2000, 5
        alice, bob = self.tls_peer('alice'), self.tls_peer('bob')
        lines = ['%03d' % i for i in range(750)]  # 3 KB in one write: one record
        alice.send(''.join(l + '\n' for l in lines))
        self.assertEqual([bob.line() for _ in lines], ['<alice> ' + l for l in lines])

    def test_what_tls_sends_is_counted_as_it_leaves(self):
        # SSL_write of a big buffer can put records on the wire and still say
        # "would block": the backlog must not count bytes already sent.
        import ssl
        cert, key, _ = certificate()
        listener = socket.socket()
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a slow reader's
        client.connect(listener.getsockname())
        raw, _ = listener.accept()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, chat.SEND_BUFFER_BYTES)  # as the server
        for sock in (listener, client, raw):
            self.addCleanup(sock.close)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        handshake = threading.Thread(target=lambda: setattr(
            self, 'tls_client', context.wrap_socket(client)))
        handshake.start()
        tls_server = chat.server_tls(cert, key)[0].wrap_socket(raw, server_side=True)
        handshake.join(TIMEOUT)
        tls_server.setblocking(False)
        data, counted, got = b'x' * (1 << 20), 0, 0
        while got < len(data):
            counted += chat.send_some(tls_server, data[counted:])
            got += len(self.tls_client.recv(65536))
            self.assertLessEqual(got, counted + chat.TLS_RECORD_BYTES)  # one record in flight
        self.assertEqual(counted, len(data))

    def test_large_and_many_small_messages(self):
        alice, bob = self.tls_peer('alice'), self.tls_peer('bob')
        big = ['%04d %s' % (i, '한' * 1300) for i in range(50)]  # 3.9 KB each
        small = ['s%d' % i for i in range(5000)]
        sender = threading.Thread(target=alice.send,
                                  args=(''.join(l + '\n' for l in big + small),))
        sender.start()
        for line in big + small:
            self.assertEqual(bob.line(), '<alice> ' + line)
        sender.join(TIMEOUT)

    def test_a_slow_tls_consumer_is_still_capped(self):
        cert, key, _ = certificate()  # a process of its own: the reader must keep up
        self.srv = ServerProcess('--rate=0', '--max-backlog=32K', '--tls-cert', cert,
                                 '--tls-key', key)
        self.addCleanup(self.srv.stop)
        alice, bob = self.tls_peer('alice'), self.tls_peer('bob')
        self.tls_peer('slow', rcvbuf=4096)
        lines = ['%05d %s' % (i, 'x' * 300) for i in range(1500)]
        self.assertEqual(flood(alice, 'alice', bob, lines), lines)
        self.srv.wait_log(r'slow left \(too slow\)')

    def test_openssl_s_client_joins(self):
        bob = self.tls_peer('bob')
        result = subprocess.run(
            ['openssl', 's_client', '-quiet', '-connect', '127.0.0.1:%d' % self.srv.port],
            input=b'/nick ossl\nhi from openssl\n/quit\n', stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=TIMEOUT)
        bob.expect(r'^<ossl> hi from openssl$')
        self.assertIn(b'-!- Welcome, ', result.stdout)
        # The session ends with TLS's close_notify, not a bare FIN: s_client
        # would print "unexpected eof while reading" and exit 1.
        self.assertNotIn(b'unexpected eof', result.stderr)
        self.assertEqual(result.returncode, 0)


    def test_ncat_ssl_leaves_cleanly(self):
        bob = self.tls_peer('bob')
        ncat = subprocess.Popen([need('ncat'), '--ssl', '127.0.0.1', str(self.srv.port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(PtySession.reap, ncat)
        # Its input stays open until the server has closed: ncat's own
        # close_notify must not be what ends the session.
        ncat.stdin.write(b'/nick ncat\nhi from ncat\n/quit\n')
        ncat.stdin.flush()
        bob.expect(r'^<ncat> hi from ncat$')
        received = read_to_the_end(ncat.stdout)  # the end the server made
        ncat.stdin.close()
        errors = ncat.stderr.read()
        self.assertEqual(ncat.wait(TIMEOUT), 0, errors)  # not "Input/output error"
        self.assertIn(b'-!- Goodbye', received)

class TestPassword(PtySession, ServerTestCase):
    SERVER_OPTIONS = {'password': 'sesame', 'rate': 0}

    def newcomer(self):
        conn = Conn(self.srv.port)
        self.addCleanup(conn.close)
        self.assertEqual(conn.line(), '-!- ' + chat.PASSWORD_PROMPT)
        return conn

    def member(self, name):
        conn = self.newcomer()
        conn.send('/pass sesame\n')
        conn.expect(r'^-!- %s$' % chat.PASSWORD_ACCEPTED)
        conn.expect(r'^-!- \d+ online')
        conn.send('/nick %s\n' % name)
        conn.expect(r'is now known as %s$' % name)
        return conn

    def test_nothing_of_the_room_before_the_password(self):
        alice = self.member('alice')
        door = self.newcomer()
        alice.send('private chatter\n')
        door.send('hello?\n/who\n/nick spy\n/pass wrong\n')
        self.assertEqual([door.line() for _ in range(4)],
                         ['!!! send /pass PASSWORD first'] * 3 +
                         ['!!! wrong password (2 tries left)'])
        self.assertEqual(self.sync(alice), [])  # no join, no "hello?"
        door.send('/pass sesame\n')
        self.assertEqual(door.line(), '-!- ' + chat.PASSWORD_ACCEPTED)
        door.expect(r'^\[\S+\] <alice> private chatter$')  # only now: the history
        alice.expect(r'^-!- guest-2 joined$')

    def test_no_room_line_leaks_to_the_door_in_the_same_turn(self):
        # Stepped by hand, so that a member's message and a reply to a peer
        # at the password prompt are handled in one loop turn, in both
        # orders (the loop rotates the order of events each turn).
        server, address = stepped_server(self, password='pw', rate=0)
        member, door = (socket.create_connection(address) for _ in range(2))
        for sock in (member, door):
            self.addCleanup(sock.close)
            sock.settimeout(TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        member.sendall(b'/pass pw\n')
        step_until(server, lambda: len(server.names) == 1 and len(server.peers) == 2,
                   'one in, one at the door')
        waiting = [p for p in server.peers if p.key is None][0]
        ends = [p.sock for p in server.peers]
        import select
        for round in range(1, 5):
            for _ in range(round):  # idle turns: the next one's parity varies
                server.run_once(timeout=0)
            member.sendall(b'secret chatter\n')
            door.sendall(b'hello?\n')
            wait_until(lambda: len(select.select(ends, [], [], 0)[0]) == 2, 'both lines in')
            server.run_once(timeout=0)  # one turn handles both
            self.assertEqual(waiting.lines, round)
        received = b''
        while received.count(b'first') < 4:
            received += door.recv(4096)
        self.assertEqual(received.decode(), '-!- %s\n' % chat.PASSWORD_PROMPT
                         + '!!! send /pass PASSWORD first\n' * 4)

    def test_three_wrong_passwords_close_the_connection(self):
        door = self.newcomer()
        door.send('/pass a\n/pass b\n/pass c\n/pass sesame\n')
        self.assertEqual(door.expect_closed(), ['!!! wrong password (2 tries left)',
                                                '!!! wrong password (1 tries left)',
                                                '!!! wrong password: goodbye'])
        self.srv.wait_log(r'wrong password from 127\.0\.0\.1:\d+ \(0 tries left\)')
        self.assertFalse([l for l in self.srv.logs if 'sesame' in l or ' a ' in l])

    def test_no_password_in_time_closes_and_frees_the_slot(self):
        patch_constant(self, 'PASSWORD_SEC', 3)  # time enough for the second to come
        self.srv.server.gate.max_clients = 1
        door = self.newcomer()
        refused = Conn(self.srv.port)
        self.addCleanup(refused.close)
        self.assertEqual(refused.expect_closed(), ['!!! server full (1 clients); try later'])
        self.assertEqual(door.expect_closed(), ['!!! no password in 3 s: goodbye'])
        self.member('late')  # its slot is free again

    def test_the_client_gives_chat_password(self):
        alice = self.member('alice')
        env = dict(os.environ, CHAT_PASSWORD='sesame')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), '--name', 'piped',
                          stdin_data='with the password\n', env=env)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        alice.expect(r'^<piped> with the password$')
        self.assertNotIn(chat.PASSWORD_PROMPT, result.stdout)

    def test_the_client_without_the_password_says_why(self):
        env = dict(os.environ, CHAT_PASSWORD='wrong')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), stdin_data='', env=env)
        self.assertEqual((result.returncode, result.stderr),
                         (1, "chat.py: error: CHAT_PASSWORD is not the room's password\n"))
        env.pop('CHAT_PASSWORD')
        result = run_chat('client', '127.0.0.1', str(self.srv.port), stdin_data='', env=env)
        self.assertEqual((result.returncode, result.stderr), (1, 'chat.py: error: this room '
                                                             'needs a password: set CHAT_PASSWORD\n'))

    @unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
    def test_the_client_asks_on_a_terminal_without_echo(self):
        alice = self.member('alice')
        self.spawn('--name', 'asked', env={'CHAT_PASSWORD': None})
        self.read_until(lambda s: 'Password for the room:' in s.text(), 'the prompt')
        self.type('sesame\n')
        self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the line editor')
        self.assertNotIn('sesame', self.screen.text())
        self.type('typed after\r')
        alice.expect(r'^<asked> typed after$')

    @unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
    def test_the_client_stops_asking_once_the_server_says_goodbye(self):
        patch_constant(self, 'PASSWORD_SEC', 0.5)
        self.spawn(env={'CHAT_PASSWORD': None})
        self.read_until(lambda s: 'Password for the room:' in s.text(), 'the prompt')
        self.srv.wait_log(r'no password in 0 s')  # the server has given up
        self.type('too late\n')
        self.read_until(lambda s: 'goodbye' in s.text(), 'the reason')
        self.assertEqual(self.proc.wait(TIMEOUT), 1)
        self.assertEqual(self.screen.text().count('Password for the room:'), 1)
        self.assertIn('chat.py: error: no password in 0 s: goodbye', self.screen.text())

    def test_a_password_file_with_a_bom_or_not_utf8(self):
        with tempfile.NamedTemporaryFile('wb') as handle:
            handle.write('\ufeff\ube44\ubc00\r\n'.encode('utf-8'))  # Notepad's way
            handle.flush()
            self.assertEqual(chat.read_secret(handle.name, 'CHAT_PASSWORD'), '\ube44\ubc00')
        with tempfile.NamedTemporaryFile('wb') as handle:
            handle.write(b'caf\xe9\n')  # Latin-1
            handle.flush()
            result = run_chat('server', '0', '--password-file', handle.name)
        self.assertEqual((result.returncode, result.stderr), (
            1, 'chat.py: error: password file %s is not UTF-8 text\n' % handle.name))

    def test_a_korean_chat_password_under_the_c_locale(self):
        env = {k.encode(): v.encode() for k, v in os.environ.items()}
        env.update({b'LC_ALL': b'C', b'LANG': b'C', b'CHAT_PASSWORD': '\ube44\ubc00'.encode()})
        env.pop(b'PYTHONIOENCODING', None)
        server = ServerProcess(env=env)
        self.addCleanup(server.stop)
        result = subprocess.run([sys.executable, CHAT, 'client', '127.0.0.1', str(server.port),
                                 '--name', 'kim'], input=b'hi\n', env=env, timeout=TIMEOUT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual((result.returncode, result.stderr), (0, b''))
        self.assertIn(b'is now known as kim', result.stdout)
        env[b'CHAT_PASSWORD'] = b''  # a mistake, not an open room
        result = subprocess.run([sys.executable, CHAT, 'server', '0'], timeout=TIMEOUT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual((result.returncode, result.stderr),
                         (1, b'chat.py: error: CHAT_PASSWORD is set but empty\n'))

    def test_a_password_file_or_chat_password(self):
        with tempfile.NamedTemporaryFile('w', suffix='.pw') as handle:
            handle.write('from a file\r\nsecond line\n')
            handle.flush()
            self.assertEqual(chat.read_secret(handle.name, 'CHAT_PASSWORD'), 'from a file')
            server = ServerProcess('--password-file', handle.name)
            self.addCleanup(server.stop)
            conn = Conn(server.port)
            self.addCleanup(conn.close)
            self.assertEqual(conn.line(), '-!- ' + chat.PASSWORD_PROMPT)
            conn.send('/pass from a file\n')
            self.assertEqual(conn.line(), '-!- ' + chat.PASSWORD_ACCEPTED)
        os.environ['CHAT_PASSWORD'] = 'from the environment'
        self.addCleanup(os.environ.pop, 'CHAT_PASSWORD')
        self.assertEqual(chat.read_secret(None, 'CHAT_PASSWORD'), 'from the environment')
        with tempfile.NamedTemporaryFile('w') as empty:
            result = run_chat('server', '0', '--password-file', empty.name)
        self.assertEqual((result.returncode, result.stderr.endswith('is empty\n')), (1, True))
        result = run_chat('server', '0', '--password-file', '/nonexistent/pw')
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r'^chat\.py: error: cannot read password file '
                         r'/nonexistent/pw: No such file or directory\n$')

    def test_an_http_request_is_closed_before_reaching_the_room(self):
        # What a web page can make any visitor's browser send: a request
        # line longer than --max-line, and a body of commands.
        alice = self.member('alice')
        for request in ('GET / HTTP/1.1\r\nHost: x\r\n\r\n',
                        'POST /%s HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n'
                        '/pass wrong\n/pass sesame\n' % ('a' * 5000)):
            conn = Conn(self.srv.port, hello=False)
            self.addCleanup(conn.close)
            conn.send(request)
            answer = conn.expect_closed()  # the page or a 404, not the password prompt
            self.assertRegex(answer[0], r'^HTTP/1\.1 (200|404) ')
            self.assertFalse([line for line in answer if line.startswith('-!- ')])
        self.srv.wait_log(r'127\.0\.0\.1:\d+ HTTP: 404 /aaaa')
        self.assertEqual(self.sync(alice), [])
        self.assertFalse([line for line in self.srv.logs if 'password' in line
                          and 'gave' not in line])  # no guess counted, none let in


class DualStackServer(ServerThread):
    """A ServerThread on all interfaces, IPv4 and IPv6: so that 127.0.0.1,
    ::1 and the machine's LAN address are three different peers."""

    def __init__(self, **options):
        listeners = chat.open_listeners(None, 0)
        self.port = listeners[0].getsockname()[1]
        self.logs = []
        self.server = chat.Server(listeners, log=self.logs.append, **options)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


def is_closed_at_once(test, port, host, why=None, source=None):
    """Connect from host; the server must close at once, with only the line
    why (a regular expression), or nothing."""
    conn = Conn(port, host=host, source=source)
    test.addCleanup(conn.close)
    lines = conn.expect_closed()
    conn.close()
    if why is None:
        test.assertEqual(lines, [])
    else:
        test.assertEqual(len(lines), 1, lines)
        test.assertRegex(lines[0], why)


class TestAddressRules(unittest.TestCase):

    def start(self, **options):
        server = DualStackServer(**options)
        self.addCleanup(server.stop)
        return server

    def test_deny_ipv4_and_allow_ipv6(self):
        server = self.start(deny=[chat.parse_network('127.0.0.0/8')])
        is_closed_at_once(self, server.port, '127.0.0.1')
        server.wait_log(r'refused 127\.0\.0\.1:\d+: denied \(--deny\)')
        Conn(server.port, host='::1').expect(r'^-!- Welcome')

    def test_allow_only_ipv6_loopback(self):
        server = self.start(allow=[chat.parse_network('::1')])
        is_closed_at_once(self, server.port, '127.0.0.1')
        server.wait_log(r'refused 127\.0\.0\.1:\d+: not allowed \(--allow\)')
        Conn(server.port, host='::1').expect(r'^-!- Welcome')

    def test_deny_wins_over_allow_for_ipv6(self):
        server = self.start(allow=[chat.parse_network('::/0')], deny=[chat.parse_network('::1')])
        is_closed_at_once(self, server.port, '::1')
        server.wait_log(r'refused \[::1\]:\d+: denied')

    def test_the_flags(self):
        parser = chat.build_parser()
        args = parser.parse_args(['server', '--allow', '10.0.0.0/8', '--allow', '::1',
                                  '--deny', '10.1.2.3'])
        self.assertEqual([str(n) for n in args.allow], ['10.0.0.0/8', '::1/128'])
        self.assertEqual(run_chat('server', '--deny', 'nonsense').returncode, 2)

class TestOtherHosts(unittest.TestCase):
    """Caps, guesses and bans per host, with peers on hosts other than
    loopback: each test runs in a network namespace of its own."""

    def start(self, **options):
        server = DualStackServer(**options)
        self.addCleanup(server.stop)
        return server

    def peer(self, server, source, name=None):
        """A peer from source, past its welcome (and named, if name)."""
        conn = Conn(server.port, host=NETNS_HOSTS6[0] if ':' in source else NETNS_HOSTS[0],
                    source=source)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- \d+ online|%s' % re.escape(chat.PASSWORD_PROMPT))
        if name:
            conn.send('/nick %s\n' % name)
            conn.expect(r'is now known as %s$' % name)
        return conn

    def test_connections_per_address_are_capped_but_not_for_loopback(self):
        if not in_own_network(self):
            return
        server = self.start(max_per_address=2)
        for _ in range(3):  # loopback: not counted
            conn = Conn(server.port)
            self.addCleanup(conn.close)
            conn.expect(r'^-!- Welcome')
        host = NETNS_HOSTS[1]
        first, second = self.peer(server, host), self.peer(server, host)
        is_closed_at_once(self, server.port, NETNS_HOSTS[0], source=host,
                          why=r'^!!! too many connections from %s \(2\); try later$'
                          % re.escape(host))
        self.peer(server, NETNS_HOSTS[0])  # another host: its own count
        first.send('/quit\n')
        first.expect_closed()
        self.peer(server, host)  # a slot again

    def test_refusals_hold_no_descriptors(self):
        if not in_own_network(self):
            return
        server = self.start(max_per_address=1)
        host = NETNS_HOSTS[1]
        self.peer(server, host)
        before = len(os.listdir('/proc/self/fd'))
        for _ in range(100):
            is_closed_at_once(self, server.port, NETNS_HOSTS[0], source=host,
                              why=r'^!!! too many connections from ')
        # Each refusal closed at once: not held open for LINGER_SEC.
        self.assertLess(len(os.listdir('/proc/self/fd')), before + 10)

    def test_guessing_is_limited_per_host_and_forgotten_in_time(self):
        if not in_own_network(self):
            return
        patch_constant(self, 'GUESS_WINDOW_SEC', 1.0)
        server = self.start(password='right')
        guesser = NETNS_HOSTS[1]

        def guess(times):  # wrong passwords from the guesser's host, 3 a connection
            for tries in (3,) * (times // 3) + ((times % 3,) if times % 3 else ()):
                conn = self.peer(server, guesser)
                conn.send('/pass wrong\n' * tries + ('/quit\n' if tries < 3 else ''))
                conn.expect_closed()
        member = self.peer(server, guesser)
        member.send('/pass right\n')
        member.expect(r'^-!- \d+ online')
        guess(9)
        time.sleep(1.0)  # the window passes: those nine are forgotten
        guess(1)  # (forgotten as this one is counted)
        patch_constant(self, 'GUESS_WINDOW_SEC', 600)  # the next ones count, however slow
        guess(8)
        self.assertFalse([l for l in server.logs if 'banned' in l])
        guess(1)  # the tenth within the window
        server.wait_log(r'banned %s/32 for 600 s after 10 wrong passwords' % re.escape(guesser))
        is_closed_at_once(self, server.port, NETNS_HOSTS[0], source=guesser,
                          why=r'^!!! you are banned until \d\d:\d\d$')
        self.peer(server, NETNS_HOSTS[0])  # another host is let in
        member.send('/who\n')  # and the one already in stays
        member.expect(r'^-!- \d+ online')

    def test_a_ban_by_name_bans_the_host_and_a_newcomer_hears_why(self):
        if not in_own_network(self):
            return
        server = self.start(op_password='op')
        alice = self.peer(server, NETNS_HOSTS[0], 'alice')
        bob = self.peer(server, NETNS_HOSTS[1], 'bob')
        alice.send('/op op\n/ban bob 5\n')
        alice.expect(r'^-!- alice banned bob \(10\.200\.0\.2/32\) for 5 minutes$')
        self.assertEqual(bob.expect_closed()[-1], '!!! you were banned by alice')
        alice.expect(r'^-!- bob left \(banned by alice\)$')
        is_closed_at_once(self, server.port, NETNS_HOSTS[0], source=NETNS_HOSTS[1],
                          why=r'^!!! you are banned until \d\d:\d\d$')
        server.wait_log(r'refused 10\.200\.0\.2:\d+: banned until')
        alice.send('/bans\n')
        alice.expect(r'^-!- bans: 10\.200\.0\.2/32 \(5 minutes left\)$')
        alice.send('/unban 10.200.0.2\n')
        alice.expect(r'^-!- 10\.200\.0\.2/32 is no longer banned$')
        self.peer(server, NETNS_HOSTS[1])

    def test_a_peer_that_vanishes_is_found_out_by_keepalive(self):
        if not in_own_network(self):
            return
        for name, value in (('KEEPALIVE_IDLE_SEC', 1), ('KEEPALIVE_INTERVAL_SEC', 1),
                            ('KEEPALIVE_PROBES', 2)):
            patch_constant(self, name, value)
        server = self.start()
        self.peer(server, NETNS_HOSTS[1], 'ghost')
        set_loopback(False)  # its cable is pulled: no FIN, no reset, just silence
        self.addCleanup(set_loopback, True)
        server.wait_log(r'ghost lost the connection \(connection lost\)')

    def test_an_ipv6_address_is_banned_as_its_host_and_shown_as_typed(self):
        if not in_own_network(self):
            return
        server = self.start(op_password='op')
        alice = self.peer(server, NETNS_HOSTS[0], 'alice')
        alice.send('/op op\n/ban 2001:db8:1::2\n')
        alice.expect(r'^-!- alice banned 2001:db8:1::2 until the server restarts$')
        for neighbour in NETNS_HOSTS6[:2]:  # the same /64: the same host
            is_closed_at_once(self, server.port, NETNS_HOSTS6[0], source=neighbour,
                              why=r'^!!! you are banned until the server restarts$')
        self.peer(server, NETNS_HOSTS6[2])  # another /64
        alice.send('/bans\n/unban 2001:db8:1::2\n')
        alice.expect(r'^-!- bans: 2001:db8:1::2 \(until restart\)$')
        alice.expect(r'^-!- 2001:db8:1::2 is no longer banned$')
        self.peer(server, NETNS_HOSTS6[1])


class TestOperators(ServerTestCase):
    SERVER_OPTIONS = {'op_password': 'opsecret', 'rate': 0}

    def setUp(self):
        self.srv = DualStackServer(**self.SERVER_OPTIONS)
        self.addCleanup(self.srv.stop)
        self.conns = []

    def operator(self, name='alice'):
        conn = self.connect(name, host='::1')
        conn.send('/op opsecret\n')
        conn.expect(r'^-!- %s is now an operator$' % name)
        return conn

    def test_only_operators_may_kick_and_ban(self):
        bob = self.connect('bob')
        for command in ('/kick alice', '/ban alice', '/unban 1.2.3.4', '/bans'):
            bob.send(command + '\n')
            bob.expect(r'^!!! /%s is for operators \(/op PASSWORD\)$' % command[1:].split()[0])
        bob.send('/op wrong\n')
        bob.expect(r'^!!! wrong operator password \(2 tries left\)$')

    def test_kick_is_announced_with_its_reason(self):
        alice, bob, carol = self.operator(), self.connect('bob'), self.connect('carol')
        alice.send('/kick bob flooding the room\n')
        self.assertEqual(bob.expect_closed()[-1], '!!! you were kicked by alice: flooding the room')
        carol.expect(r'^-!- bob left \(kicked by alice: flooding the room\)$')
        self.srv.wait_log(r'bob was kicked by alice: flooding the room')

    def test_banning_someone_on_a_shared_address_bans_only_them(self):
        alice = self.operator()  # on ::1
        bob, carol = self.connect('bob'), self.connect('carol')  # on 127.0.0.1
        alice.send('/ban bob 5\n')
        alice.expect(r'^-!- alice banned bob by name \(a shared address\) for 5 minutes$')
        self.assertEqual(bob.expect_closed()[-1], '!!! you were banned by alice')
        self.conns.remove(bob)
        carol.expect(r'^-!- bob left \(banned by alice\)$')
        newcomer = self.connect()  # from the same address: let in
        newcomer.send('/nick bob\n')
        newcomer.expect(r'^!!! cannot use the name bob: the name is banned until \d\d:\d\d$')
        alice.send('/bans\n')
        alice.expect(r'^-!- bans: bob \(5 minutes left\)$')
        alice.send('/unban BOB\n')
        alice.expect(r'^-!- bob is no longer banned$')
        newcomer.send('/nick bob\n')
        newcomer.expect(r'is now known as bob$')

    def test_those_put_out_hear_nothing_said_after_in_the_same_turn(self):
        alice = self.operator()
        bob, carol = self.connect('bob'), self.connect('carol')
        alice.send('/kick carol\nafter the kick\n/ban bob 5\nafter the ban\n')  # one turn
        self.assertEqual(carol.expect_closed()[-1], '!!! you were kicked by alice')
        said = bob.expect_closed()
        self.assertIn('<alice> after the kick', said)  # said before the ban: heard
        self.assertEqual(said[-1], '!!! you were banned by alice')
        self.conns.remove(bob)
        self.conns.remove(carol)

    def test_a_ban_by_address_until_restart(self):
        alice = self.operator()
        alice.send('/ban 127.0.0.0/8\n/bans\n/ban nobody.here\n/unban 10.0.0.1\n'
                   '/ban 10.0.0.1 0\n/ban 2001:DB8::7 9\n/bans\n')
        alice.expect(r'^-!- alice banned 127\.0\.0\.0/8 until the server restarts$')
        alice.expect(r'^-!- bans: 127\.0\.0\.0/8 \(until restart\)$')
        alice.expect(r'^!!! nobody\.here is neither online nor an address$')
        alice.expect(r'^!!! 10\.0\.0\.1 is not banned \(see /bans\)$')
        alice.expect(r'^!!! a ban lasts at least 1 minute \(none: until restart\)$')
        alice.expect(r'^-!- alice banned 2001:DB8::7 for 9 minutes$')  # as typed
        alice.expect(r'^-!- bans: 127\.0\.0\.0/8 \(until restart\), 2001:DB8::7 '
                     r'\(9 minutes left\)$')
        is_closed_at_once(self, self.srv.port, '127.0.0.1',
                          why=r'^!!! you are banned until the server restarts$')

    def test_a_loopback_address_banned_as_typed(self):
        alice, bob = self.operator(), self.connect('bob')  # on ::1 and 127.0.0.1
        alice.send('/ban ::1 3\n')
        bob.expect(r'^-!- alice banned ::1 for 3 minutes$')  # not ::/64
        self.assertEqual(alice.expect_closed()[-1], '!!! you were banned by alice')
        self.conns.remove(alice)
        is_closed_at_once(self, self.srv.port, '::1',
                          why=r'^!!! you are banned until \d\d:\d\d$')
        bob.send('/who\n')
        bob.expect(r'^-!- 1 online in #lobby: bob$')

    def test_no_operator_password_means_no_operators(self):
        self.srv.server.gate.op_password = None
        bob = self.connect('bob')
        bob.send('/op anything\n')
        bob.expect(r'^!!! this server has no operators$')

    @unittest.skipIf(sys.platform == 'win32', 'pseudo-terminals are POSIX')
    def test_the_servers_own_terminal_takes_operator_commands(self):
        import pty
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        # In the foreground of a terminal of its own, as when started by hand.
        server = ServerProcess(stdin=slave, python=(sys.executable, '-c', TTY_WRAPPER),
                               start_new_session=True)
        os.close(slave)
        self.addCleanup(server.stop)
        bob, carol = Conn(server.port), Conn(server.port)
        for conn in (bob, carol):
            self.addCleanup(conn.close)
            conn.expect(r'^-!- \d online')
        bob.send('/nick bob\n')
        carol.expect(came('bob'))
        os.write(master, b'maintenance at noon\n/nick evil\n/kick bob bye\n')
        carol.expect(r'^-!- server: maintenance at noon$')
        carol.expect(r'^-!- bob left \(kicked by server: bye\)$')
        server.wait_log(r'bob was kicked by server: bye')


class TestBackgroundServer(PtySession, unittest.TestCase):

    def test_a_server_in_the_background_ignores_the_terminal(self):
        self.spawn(command=[need('bash'), '--norc', '--noprofile', '--noediting', '-i'],
                   env={'PS1': '$ ', 'TERM': 'dumb'})
        self.type('%s %s server 0 --host 127.0.0.1 --quiet &\n' % (sys.executable, CHAT))
        self.read_until(lambda s: 'join with:' in s.text(), 'the banner')
        port = int(re.search(r'listening on 127\.0\.0\.1:(\d+)', self.screen.text()).group(1))
        # Keys typed while a foreground command runs wait in the terminal's
        # queue, readable to all: a background server reading them would stop.
        self.type('sleep 1; echo slept\ntyped ahead')
        self.read_until(lambda s: 'slept' in s.text().replace('echo slept', ''), 'sleep to end')
        self.type('\n')
        conn = Conn(port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- Welcome')  # still serving
        self.type('kill %1; exit\n')
        self.proc.wait(TIMEOUT)


class TestTlsCommandLine(PtySession, unittest.TestCase):

    def own_config(self):
        """An environment whose chat.py files (certificate, known hosts) go to
        a folder of this test's own; and that folder."""
        folder = tempfile.mkdtemp(prefix='chat-test-home-')
        self.addCleanup(shutil.rmtree, folder, True)
        return dict(os.environ, XDG_CONFIG_HOME=folder), os.path.join(folder, 'chat.py')

    def test_server_tls_makes_its_certificate_once_and_keeps_it(self):
        env, folder = self.own_config()
        prints = []
        for made in ('made', 'using'):
            server = ServerProcess('--tls', env=env)
            server.wait_log(r'%s a TLS certificate in %s' % (made, re.escape(folder)))
            prints.append(server.proc.stdout.readline())
            server.stop()
        self.assertRegex(prints[0], r'^TLS certificate SHA-256 fingerprint: [0-9A-F:]{95}\n$')
        self.assertEqual(prints[0], prints[1])  # the same certificate, kept
        self.assertEqual(os.stat(os.path.join(folder, 'server-key.pem')).st_mode & 0o777, 0o600)

    def test_client_tls_trusts_on_first_use_like_ssh(self):
        env, folder = self.own_config()
        server = ServerProcess('--tls', env=env)
        self.addCleanup(server.stop)
        fingerprint = server.proc.stdout.readline().split(': ')[1].strip()
        port = str(server.port)
        piped = run_chat('client', '127.0.0.1', port, '--tls', stdin_data='hi\n', env=env)
        self.assertEqual(piped.returncode, 1)  # it cannot ask: refused, saying how to pin
        self.assertIn('--tls-fingerprint %s' % fingerprint, piped.stderr)
        self.srv = server  # spawn() connects to self.srv.port
        self.spawn('--tls', '--name', 'tofu', env={'XDG_CONFIG_HOME': env['XDG_CONFIG_HOME']})
        self.read_until(lambda s: '[yes/no]?' in s.text(), 'the question')
        self.assertIn(fingerprint, self.screen.text().replace('\n', ''))
        self.type('yes\n')
        self.read_until(lambda s: 'connected to 127.0.0.1:%s: TLS 1.' % port in s.text()
                        and 'certificate pinned' in s.text().replace('\n      ', ''),
                        'what protects the session')
        self.read_until(lambda s: s.line().startswith(PROMPT.rstrip()), 'the room')
        self.type('/quit\r')
        self.assertEqual(self.wait_exit(), 0)
        again = run_chat('client', '127.0.0.1', port, '--tls', stdin_data='hi\n', env=env)
        self.assertEqual((again.returncode, again.stderr), (0, ''))  # remembered: no question
        with open(os.path.join(folder, 'known_hosts')) as known:
            self.assertEqual(known.read(), '127.0.0.1:%s %s\n' % (port, fingerprint))
        with open(os.path.join(folder, 'known_hosts'), 'w') as known:  # as if it changed
            known.write('127.0.0.1:%s %s\n' % (port, 'AB:' * 31 + 'AB'))
        changed = run_chat('client', '127.0.0.1', port, '--tls', stdin_data='hi\n', env=env)
        self.assertEqual(changed.returncode, 1)
        self.assertIn("THE SERVER'S CERTIFICATE HAS CHANGED", changed.stderr)
        self.assertIn(fingerprint, changed.stderr)

    def test_a_plain_session_says_it_is_not_encrypted(self):
        server = ServerProcess()
        self.addCleanup(server.stop)
        self.srv = server
        self.spawn('--name', 'plain')
        self.read_until(lambda s: 'connected to 127.0.0.1:%d: not encrypted' % server.port
                        in s.text(), 'what protects the session: nothing')

    def test_tls_flag_errors_are_one_line(self):
        cert, key, printed = certificate()
        result = run_chat('server', '0', '--tls-cert', cert)
        self.assertEqual((result.returncode, result.stderr),
                         (1, 'chat.py: error: --tls-cert and --tls-key go together\n'))
        result = run_chat('server', '0', '--tls-cert', key, '--tls-key', key)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r'^chat\.py: error: cannot use TLS certificate ')

    def test_the_banner_says_how_to_pin(self):
        cert, key, printed = certificate()
        server = ServerProcess('--tls-cert', cert, '--tls-key', key)
        self.addCleanup(server.stop)
        self.assertEqual(server.proc.stdout.readline(),
                         'TLS certificate SHA-256 fingerprint: %s\n' % printed)
        self.assertEqual(server.proc.stdout.readline(),
                         'join with: python3 chat.py client 127.0.0.1:%d --tls   '
                         '(or: openssl s_client -quiet -connect 127.0.0.1:%d)\n'
                         % (server.port, server.port))
        self.assertEqual(server.proc.stdout.readline(),
                         '       or open https://127.0.0.1:%d/ in a browser\n' % server.port)
        self.assertEqual(server.proc.stdout.readline(),
                         'security: TLS, no room password, no operators\n')

    def test_tls_password_and_pinning_together(self):
        cert, key, printed = certificate()
        env = dict(os.environ, CHAT_PASSWORD='both')
        server = ServerProcess('--tls-cert', cert, '--tls-key', key, env=env)
        self.addCleanup(server.stop)
        port = str(server.port)
        right = run_chat('client', '127.0.0.1', port, '--tls-fingerprint', printed,
                         '--name', 'ok', stdin_data='hi\n', env=env)
        self.assertEqual((right.returncode, right.stderr), (0, ''))
        server.wait_log(r'ok left \(quit\)')
        for args, environment in (([], env),  # plain text
                                  (['--tls-fingerprint', 'AB' * 32], env),  # wrong pin
                                  (['--tls-fingerprint', printed],  # wrong password
                                   dict(env, CHAT_PASSWORD='nope'))):
            wrong = run_chat('client', '127.0.0.1', port, '--name', 'no', *args,
                             stdin_data='hi\n', env=environment)
            self.assertEqual(wrong.returncode, 1, args)
        self.assertFalse([l for l in server.logs if ' no ' in l or 'known as no' in l])


# --- What a review found -------------------------------------------------------

class TestReviewFindings(unittest.TestCase):
    """Each of these was a real bug once."""

    def test_a_peer_banned_mid_handshake_never_enters_the_room(self):
        import ssl
        cert, key, _ = certificate()
        server, address = stepped_server(self, tls=chat.server_tls(cert, key)[0])
        raw = socket.create_connection(address, TIMEOUT)
        self.addCleanup(raw.close)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)

        def shake():  # one step of the client's handshake; True when done
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            raw.sendall(outgoing.read())
            return done
        shake()  # the ClientHello
        while not any(isinstance(p.sock, ssl.SSLSocket) for p in server.peers):
            server.run_once(timeout=0.1)
        server.run_once(timeout=0.1)  # the server has answered: half way
        operator = chat.Peer(None, 'console', burst=1)
        operator.name = 'op'
        server.cmd_ban(operator, '127.0.0.0/8')
        raw.settimeout(0.2)
        for _ in range(20):  # the client finishes its side, if the server lets it
            server.run_once(timeout=0.05)
            try:
                incoming.write(raw.recv(65536))
                shake()
            except (socket.timeout, ssl.SSLError, OSError):
                pass
        self.assertEqual(server.names, {})

    def test_private_messages_count_against_the_turns_share(self):
        server, address = stepped_server(self, max_backlog=32 * 1024)
        victim = socket.socket()
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        victim.connect(address)
        senders = [socket.create_connection(address) for _ in range(30)]
        for sock in senders + [victim]:
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
            sock.setblocking(False)
        step_until(server, lambda: len(server.names) == 31, 'everyone in')
        victim_peer = [peer for peer in server.names.values()
                       if peer.sock.getpeername() == victim.getsockname()][0]

        def drain_victim():
            got = b''
            while True:
                try:
                    data = victim.recv(65536)
                except BlockingIOError:
                    return got
                self.assertTrue(data, 'the victim was cut off')
                got += data
        drain_victim()
        for sock in senders:  # within each one's burst, 117 KB for the victim in all
            sock.sendall(('/msg %s %s\n' % (victim_peer.name, 'p' * 3900)).encode() * 3)
        received = 0
        deadline = time.monotonic() + TIMEOUT
        while received < 90 and time.monotonic() < deadline:
            server.run_once(timeout=0.1)
            received += drain_victim().count(b'[PM from ')  # it keeps up
        self.assertEqual(received, 90)
        self.assertIs(server.names.get(victim_peer.key), victim_peer)

    def test_a_peers_own_command_output_counts_against_the_turns_share(self):
        # 300 /who at once from a reader that keeps up (stepped: it reads
        # everything between two turns) would be 120 KB in one turn.
        server, address = stepped_server(self, rate=0, max_backlog=4096)
        asker = socket.socket()
        asker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # kernels hold little
        asker.connect(address)
        socks = [asker] + [socket.create_connection(address, TIMEOUT) for _ in range(39)]
        for sock in socks:
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
        wait_until(lambda: server.run_once(timeout=0.01) or len(server.names) == 40,
                   'everyone in')
        asker.setblocking(False)
        drain = lambda: b''.join(iter(lambda: recv_now(asker), b''))
        drain()
        asker.sendall(b'/who\n' * 300)
        answers = 0
        deadline = time.monotonic() + TIMEOUT
        while answers < 300 and time.monotonic() < deadline:
            server.run_once(timeout=0.01)
            data = drain()
            answers += data.count(b'-!- 40 online in #lobby: ')
        self.assertEqual(answers, 300)  # all of them, and never cut off

    def test_a_bug_in_held_input_or_admission_closes_one_peer_not_the_server(self):
        server, address = stepped_server(self, rate=0)
        sock = socket.create_connection(address, TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(b'\n')
        wait_until(lambda: server.run_once(timeout=0.01) or server.names, 'it is in')
        peer = list(server.names.values())[0]
        server.held.append(peer)
        peer.held = True

        def broken(*args):
            raise RuntimeError('boom')
        server.resume = broken
        server.run_once(timeout=0.01)  # continue_held meets the bug
        self.assertIsNone(peer.sock)
        self.assertEqual(peer.close_reason, 'server error')
        server.gate.admit = broken  # as setsockopt() on a reset connection can on BSD
        late = socket.create_connection(address, TIMEOUT)
        self.addCleanup(late.close)
        wait_until(lambda: server.run_once(timeout=0.01) or any(
            'internal error admitting' in line for line in self.logs), 'the admission error')

    def test_numbers_must_be_plain_digits(self):
        server, address = stepped_server(self, op_password='op')
        sock = socket.create_connection(address, TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(('/op op\n/who +²\n/ban 10.0.0.1 ²\n/ban 10.0.0.1 %s\n/who\n'
                      % ('9' * 400)).encode())
        received = b''
        sock.setblocking(False)
        while received.count(b'1 online in #lobby: guest-1\n') < 2:  # the welcome's, then /who's
            server.run_once(timeout=0.1)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            self.assertTrue(data, 'dropped; it said: %r' % received)
            received += data
        self.assertEqual(received.decode().count('!!! usage: /ban NAME|ADDRESS [MINUTES]'), 2)
        self.assertIn('-!- 1 online in #lobby: guest-1\n', received.decode())  # "+²" is just text

    def test_two_listeners_out_of_descriptors_in_one_turn(self):
        server, _ = stepped_server(self)
        exhausted = OSError(errno.EMFILE, 'Too many open files')
        server.pause_accepting(exhausted)
        server.pause_accepting(exhausted)  # the second listener: no KeyError
        self.assertFalse(server.accepting)
        server.resume_accepting()
        self.assertTrue(server.accepting)

    def test_a_held_turn_still_costs_flood_budget(self):
        # A tiny backlog makes every turn's share one line; the budget is 5
        # (6, less the empty line each says first).
        server, address = stepped_server(self, rate=0.001, burst=6, max_backlog=40)
        talker, reader = (socket.create_connection(address, TIMEOUT) for _ in range(2))
        for sock in (talker, reader):
            self.addCleanup(sock.close)
            sock.sendall(b'\n')
        step_until(server, lambda: len(server.names) == 2, 'both in')
        talker.sendall(b''.join(b'line %d\n' % i for i in range(20)))
        for _ in range(40):
            server.run_once(timeout=0.01)
        reader.settimeout(TIMEOUT)
        said = b''
        while not said.endswith(b'line 4\n'):
            said += reader.recv(65536)
        reader.setblocking(False)
        self.assertRaises(BlockingIOError, reader.recv, 65536)  # and no more
        self.assertEqual(said.count(b'> line '), 5)

    def test_the_history_replayed_fits_the_newcomers_cap(self):
        server, address = stepped_server(self, rate=0, history=100, max_backlog=64 * 1024)
        talker = socket.create_connection(address, TIMEOUT)
        self.addCleanup(talker.close)
        talker.sendall(b''.join(b'%03d %s\n' % (i, b'h' * 3990) for i in range(100)))
        history = server.lobby.history
        wait_until(lambda: server.run_once(timeout=0.1) or any(
            line.startswith(b'<guest-1> 099') for _, line in history), 'the last line said')
        replay = server.lobby.recent_history(server.turn_budget)
        self.assertLessEqual(sum(map(len, replay)), server.turn_budget)
        self.assertEqual(replay, [chat.replayed(entry) for entry in history][-len(replay):])
        self.assertGreater(len(replay), 0)
        # and no more is kept than /history could ever be shown
        self.assertLessEqual(sum(len(line) for _, line in history), server.max_backlog)

    def test_the_turns_share_is_never_zero(self):
        server, _ = stepped_server(self, max_backlog=2)
        self.assertEqual(server.turn_budget, 1)

    def test_numbers_on_the_command_line_are_finite(self):
        for value in ('nan', 'inf', '-1'):
            self.assertEqual(run_chat('server', '--rate', value).returncode, 2, value)

    def test_passwords_that_pass_cannot_carry_are_refused_at_start(self):
        for secret, why in (('pw ', 'spaces at its ends'), ('p\x07w', 'control characters')):
            result = run_chat('server', '0', env=dict(os.environ, CHAT_PASSWORD=secret))
            self.assertEqual(result.returncode, 1)
            self.assertIn(why, result.stderr)
        if os.name == 'posix':
            env = {k.encode(): v.encode() for k, v in os.environ.items()}
            env[b'CHAT_PASSWORD'] = b'\xff\xfe'
            result = subprocess.run([sys.executable, CHAT, 'server', '0'], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    timeout=TIMEOUT)
            self.assertIn(b'is not valid UTF-8', result.stderr)
        self.assertTrue(chat.same_secret('pw', 'pw'))
        self.assertFalse(chat.same_secret('pw', 'pw2'))

    def test_ipv4_mapped_networks_match_ipv4_peers(self):
        self.assertEqual(chat.parse_network('::ffff:10.0.0.0/104'),
                         chat.parse_network('10.0.0.0/8'))
        self.assertEqual(str(chat.host_of(chat.address_ip(('2001:db8::5', 1)))),
                         '2001:db8::/64')

    def test_connections_during_shutdown_are_not_let_in(self):
        server = ServerProcess('--rate=0', '--max-backlog=100M')
        self.addCleanup(server.stop)
        stuck = Conn(server.port, rcvbuf=4096)  # keeps the server flushing
        stuck.expect(r'^-!- Welcome, guest-1!')
        talker = Conn(server.port)
        for conn in (stuck, talker):
            self.addCleanup(conn.close)
        talker.expect(r'^-!- 2 online')
        talker.send(('z' * 1000 + '\n') * 2000)
        server.wait_log(r'guest-2 joined')
        talker.send('/who\n')
        talker.expect(r'^-!- 2 online')
        server.proc.send_signal(signal.SIGTERM)
        server.wait_log(r'shutting down')
        try:
            late = Conn(server.port)
            self.addCleanup(late.close)
            lines = late.expect_closed()
        except ConnectionError:  # reset, or refused: past SHUTDOWN_FLUSH_SEC, the listener
            lines = []  # is closed
        self.assertEqual(lines, [])
        self.assertEqual(server.proc.wait(TIMEOUT), 0)


# --- Link: several servers through Redis --------------------------------------

def free_port():
    """A TCP port free on loopback now (for a program that cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def welcomed(port, source):
    """True if a connection from source is let in, False if refused."""
    conn = Conn(port, source=source)
    try:
        return conn.line().startswith('-!- Welcome')
    finally:
        conn.close()


class RedisServer:
    """A real redis-server on a free loopback port, persistence off, in a
    folder of its own; stopped at cleanup."""

    def __init__(self, test, *options, port=None, tls=False):
        self.test, self.options, self.tls = test, options, tls
        self.port = port or free_port()
        self.folder = tempfile.mkdtemp(prefix='chat-redis-')
        test.addCleanup(shutil.rmtree, self.folder, True)
        self.proc = None
        self.start()
        test.addCleanup(self.stop)

    def start(self):
        self.proc = subprocess.Popen(
            [need('redis-server'), '--port', str(self.port), '--bind', '127.0.0.1',
             '--save', '', '--appendonly', 'no', '--dir', self.folder, '--daemonize', 'no',
             '--logfile', os.path.join(self.folder, 'redis.log')] + list(self.options),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 'redis-server on port %d' % self.port)

    def answers(self):
        try:
            with socket.create_connection(('127.0.0.1', self.port), 1) as sock:
                if self.tls:
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                    sock = context.wrap_socket(sock)
                sock.sendall(chat.resp_command('PING'))
                return sock.recv(100).startswith((b'+PONG', b'-NOAUTH'))
        except OSError:
            assert self.proc.poll() is None, 'redis-server exited: %s' % self.log()
            return False

    def log(self):
        with open(os.path.join(self.folder, 'redis.log')) as log:
            return log.read()[-2000:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def command(self, *args, password=None):
        """One command (AUTH first with password); its reply."""
        with socket.create_connection(('127.0.0.1', self.port), TIMEOUT) as sock:
            data = chat.resp_command(*args)
            if password:
                data = chat.resp_command('AUTH', password) + data
            sock.sendall(data)
            reader, replies = chat.RespReader(), []
            while len(replies) < (2 if password else 1):
                reader.feed(sock.recv(65536))
                replies += reader.replies()
            return replies[-1]

    @property
    def url(self):
        return 'redis://127.0.0.1:%d' % self.port


class TestResp(unittest.TestCase):
    """The sans-I/O RESP2 reader and writer (the link's wire format)."""

    def test_commands_are_arrays_of_bulk_strings_whatever_the_bytes(self):
        self.assertEqual(chat.resp_command('SET', 'k\r\n', b'\xff', 42),
                         b'*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n\xff\r\n$2\r\n42\r\n')

    def test_replies_split_anywhere_come_out_whole(self):
        data = (b'+OK\r\n-WRONGPASS invalid\r\n:-7\r\n$5\r\na\r\nbc\r\n$-1\r\n*-1\r\n'
                b'*2\r\n*2\r\n$1\r\nx\r\n:1\r\n*0\r\n')
        want = ['OK', 'WRONGPASS invalid', -7, b'a\r\nbc', None, None, [[b'x', 1], []]]
        for cut in range(len(data)):
            reader = chat.RespReader()
            reader.feed(data[:cut])
            got = reader.replies()
            reader.feed(data[cut:])
            got += reader.replies()
            self.assertEqual([r.args[0] if isinstance(r, chat.RespError) else r for r in got],
                             want)
            self.assertIsInstance(got[1], chat.RespError)

    def test_what_is_not_resp2_is_a_failure_not_a_guess(self):
        for bad in (b'?what\r\n', b':12a\r\n', b'$3\r\nabcd\r\n', b'x' * 70000,
                    b'*1\r\n' * 20):
            reader = chat.RespReader()
            reader.feed(bad)
            with self.assertRaises(chat.RespFailure):
                reader.replies()

    def test_every_kind_of_bus_event_has_its_handler(self):
        for kind in chat.BUS_EVENTS:
            self.assertTrue(callable(getattr(chat.Link, 'on_' + kind, None)), kind)

    def test_redis_urls(self):
        url = chat.parse_redis_url('rediss://me:p%40ss%3Aw@[::1]:7000/3')
        self.assertEqual(url, chat.RedisURL(True, '::1', 7000, 'me', 'p@ss:w', 3))
        self.assertEqual(chat.parse_redis_url('redis://:secret@localhost'),
                         chat.RedisURL(False, 'localhost', 6379, None, 'secret', 0))
        for bad in ('http://h', 'redis://', 'redis://h:99999', 'redis://h/x', 'h:6379'):
            with self.assertRaises(chat.UserError):
                chat.parse_redis_url(bad)


class LinkTests:
    """Servers as processes, linked through a real redis-server."""

    def setUp(self):
        self.redis = RedisServer(self)

    def linked_server(self, *args, url=None, **kw):
        given = ['--redis', url or self.redis.url] if url != '' else []  # '': environment
        server = ServerProcess(*given + list(args), **kw)
        self.addCleanup(server.stop)
        server.wait_log(r'link: linked through Redis')
        return server

    def three(self, *args):
        return [self.linked_server(*args) for _ in range(3)]

    def join(self, server, name):
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        conn.expect(r'^-!- \d+ online in #lobby')
        conn.send('/nick %s\n' % name)
        conn.expect(r'is now known as %s$' % re.escape(name))
        conn.name = name
        return conn

    def join_with_token(self, server, name):
        """Someone on server, called name, and the token to resume it."""
        conn = Conn(server.port)
        self.addCleanup(conn.close)
        token = conn.expect(RESUME_LINE)[1].group(1)
        conn.send('/nick %s\n' % name)
        conn.name = name
        return conn, token

    def met(self, resumable, *placed):
        """resumable, a (server, name), joined with the token to resume it,
        then each (server, name) of placed; returned once all of them know
        each other by name: the token, then the connections in that order."""
        first, token = self.join_with_token(*resumable)
        conns = [first] + [self.join(server, name) for server, name in placed]
        self.everyone_knows(conns, len(conns))
        return [token] + conns

    def resume(self, server, name, command):
        """A new connection to server that sends command (/resume ...) to
        come back as name."""
        conn = Conn(server.port, hello=False)
        self.addCleanup(conn.close)
        conn.name = name
        conn.send(command + '\n')
        return conn

    def everyone_knows(self, conns, count):
        """Wait until every one of conns sees count people in its room, all
        of conns among them by name: a count alone could count someone whose
        /nick has not yet come over the bus under the guest name."""
        names = {conn.name for conn in conns}

        def knows(conn):
            listed = re.match(r'-!- (\d+) online in #\S+: (.*)$', self.who(conn))
            return (int(listed.group(1)) == count and
                    names <= {name.split(' ')[0] for name in listed.group(2).split(', ')})
        for conn in conns:
            wait_until(lambda: knows(conn), '%s to see %d people, %s among them' % (
                conn.name, count, ', '.join(sorted(names))))

    def who(self, conn):
        conn.send('/who\n')
        return conn.expect(r'^-!- \d+ online in #.*')[1].group(0)

    def gone(self, conn, name):
        """Wait until conn's server knows no one called name."""
        def asked():
            conn.send('/whois %s\n' % name)
            return conn.expect(r'^(-!- %s:|!!! no one called %s)' % (name, name))[1].group(
                0).startswith('!!!')
        wait_until(asked, '%s to be gone' % name)


class TestLink(LinkTests, unittest.TestCase):

    def test_three_servers_are_one_chat(self):
        one, two, three = self.three()
        ann, ben, cat = self.join(one, 'ann'), self.join(two, 'ben'), self.join(three, 'cat')
        self.everyone_knows([ann, ben, cat], 3)
        cat.send('/who\n')
        cat.expect(r'^-!- 3 online in #lobby: ann, ben, cat$')
        ann.send('hello from one\n/me waves\n')
        for conn in (ben, cat):
            conn.expect(r'^<ann> hello from one$')
            conn.expect(r'^\* ann waves$')
        # Private messages and /reply, across servers, and nothing to the others.
        cat.send('/msg ann psst\n')
        cat.expect(r'^\[PM to ann\] psst$')
        ann.expect(r'^\[PM from cat\] psst$')
        ann.send('/reply got it\n')
        cat.expect(r'^\[PM from ann\] got it$')
        # Rooms, topics, away, whois.
        ben.send('/join side\n/topic the side room\n/away lunch\n')
        ben.expect(r'^-!- ben set the topic: the side room$')
        two.wait_log(r'ben set the topic of #side: the side room$')  # not the topic before
        ann.expect(r'^-!- ben left for #side$')
        cat.expect(r'^-!- ben left for #side$')  # and three has read that far on the bus,

        def away_known():  # then ben's topic and away, which came after
            cat.send('/whois ben\n')
            return cat.expect(r'^-!- ben: ')[1].string.endswith('away: lunch')
        wait_until(away_known, 'three to know ben is away')
        cat.send('/rooms\n')
        cat.expect(r'^-!-   #lobby \(2\)$')
        cat.expect(r'^-!-   #side \(1\): the side room$')
        cat.send('/who #side\n')
        cat.expect(r'^-!- 1 online in #side: ben \(away\)$')
        cat.send('/whois ben\n')
        cat.expect(r'^-!- ben: in #side, on another server, away: lunch$')
        cat.send('/msg ben are you there\n')
        cat.expect(r'^-!- ben is away: lunch$')
        ben.expect(r'^\[PM from cat\] are you there$')
        cat.send('/join side\n')
        cat.expect(r'^-!- Topic of #side: the side room$')
        ben.expect(r'^-!- cat joined$')
        # Leaving is heard everywhere, and the name is free everywhere.
        ben.send('/join lobby\n')
        ann.expect(r'^-!- ben joined$')
        ann.send('/quit bye\n')
        ben.expect(r'^-!- ann left \(quit: bye\)$')
        self.gone(cat, 'ann')
        self.join(three, 'ann')
        ben.expect(came('ann'))

    def test_one_order_for_every_receiver_whichever_server_it_is_on(self):
        servers = self.three('--rate=0')
        senders = [self.join(server, 'talker%d' % i) for i, server in enumerate(servers)]
        readers = [self.join(server, 'reader%d' % i) for i, server in enumerate(servers)]
        self.everyone_knows(senders + readers, 6)
        lines = 200
        threads = [threading.Thread(target=sender.send, args=(''.join(
            '%s line %d\n' % (sender.name, n) for n in range(lines)),)) for sender in senders]
        for thread in threads:
            thread.start()
        seen = []
        for reader in readers:
            got = []
            while len(got) < 3 * lines:
                line = reader.line()
                if line.startswith('<talker'):
                    got.append(line)
            seen.append(got)
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(seen[0], seen[1])
        self.assertEqual(seen[0], seen[2])
        for sender in senders:  # each sender's own lines stay in their order
            own = [line for line in seen[0] if line.startswith('<%s>' % sender.name)]
            self.assertEqual(own, ['<%s> %s line %d' % (sender.name, sender.name, n)
                                   for n in range(lines)])
        # And the senders hear the others' lines in that same order, less their own.
        for sender in senders:
            got = []
            while len(got) < 2 * lines:
                line = sender.line()
                if line.startswith('<talker'):
                    got.append(line)
            self.assertEqual(got, [line for line in seen[0]
                                   if not line.startswith('<%s>' % sender.name)])

    def test_a_name_is_one_person_s_across_servers_even_in_a_race(self):
        one, two = self.linked_server(), self.linked_server()
        left, right = self.join(one, 'left'), self.join(two, 'right')
        self.everyone_knows([left, right], 2)
        right.send('/nick left\n')
        right.expect(r'^!!! cannot use the name left: the name is taken by left$')
        for round in range(8):  # both ask at once; one keeps it, the other is told
            name = 'race%d' % round
            marks = {left: len(left.seen), right: len(right.seen)}
            left.send('/nick %s\n' % name)
            right.send('/nick %s\n' % name)
            wait_until(lambda: self.agree(left, right, name), 'one %s on both servers' % name)
            holders = [conn for conn in (left, right)
                       if not self.whois(conn, name).endswith('on another server')]
            self.assertEqual(len(holders), 1)
            loser = right if holders[0] is left else left
            self.assertTrue(any(re.match(r'^(!!! cannot use the name %s: the name is taken|'
                                         r'-!- %s took the name %s on another server first: '
                                         r'you are guest-\d+ now)' % (name, name, name), line)
                                for line in loser.seen[marks[loser]:]), loser.seen[marks[loser]:])
            left.send('/nick left%d\n' % round)
            right.send('/nick right%d\n' % round)
            wait_until(lambda: self.agree(left, right, 'left%d, right%d' % (round, round)),
                       'both renamed')

    def agree(self, left, right, names):
        """True if both servers list the same two people, names among them."""
        seen = [self.who(left), self.who(right)]
        return seen[0] == seen[1] and seen[0].startswith('-!- 2 online') and (
            seen[0].count(names) == 1)

    def whois(self, conn, name):
        conn.send('/whois %s\n' % name)
        return conn.expect(r'^-!- %s: .*' % name)[1].group(0)

    def test_redis_restarted_mid_chat(self):
        one = self.linked_server('--op-password-file', self.op_file())
        two = self.linked_server()
        ann, amy, ben = self.join(one, 'ann'), self.join(one, 'amy'), self.join(two, 'ben')
        self.everyone_knows([ann, amy, ben], 3)
        far = Conn(two.port, source='127.0.0.2')
        self.addCleanup(far.close)
        far.expect(r'^-!- \d+ online')
        self.redis.stop()
        for conn in (ann, amy, ben):
            conn.expect(r'^-!- the link to the other servers is down; only people on this '
                        r'server hear you$')
        ann.send('said while alone\n')
        amy.expect(r'^<ann> said while alone$')
        ann.send('/op opsecret\n/ban 127.0.0.2 5\n')  # reaches the others once linked
        ann.expect(r'^-!- ann banned 127\.0\.0\.2 for 5 minutes$')
        ann.send('/topic set while apart\n')  # so does this
        amy.expect(r'^-!- ann set the topic: set while apart$')
        amy.send('/nick zed\n')  # apart, both servers let someone take one name:
        amy.expect(r'^-!- amy is now known as zed$')
        ben.send('/nick zed\n')
        ben.expect(r'^-!- ben is now known as zed$')
        self.redis.start()
        for conn in (ann, amy, ben):
            conn.expect(r'^-!- linked again$')
        # the earlier claim keeps it; the other is renamed, and told
        _, match = ben.expect(r'^-!- zed took the name zed on another server first: you are '
                              r'(guest-\d+) now$')
        ben.name = match.group(1)
        amy.name = 'zed'
        ann.send('said when linked again\n')
        before, _ = ben.expect(r'^<ann> said when linked again$')
        self.assertNotIn('<ann> said while alone', before)
        self.assertEqual(far.expect_closed()[-1], '!!! you were banned by ann')
        self.assertIn('-!- ann set the topic: set while apart', before)
        self.assertEqual(json.loads(self.redis.command('HGET', 'chat:topics', 'lobby'))[1],
                         'set while apart')  # for servers linked later
        self.everyone_knows([ann, ben], 3)  # re-announced: everyone again, no one twice
        for conn in (ann, ben):
            self.assertEqual(sum('link to the other servers is down' in line
                                 for line in conn.seen), 1)
        amy.expect(r'^<ann> said when linked again$')
        self.assertEqual(sum('set the topic' in line for line in amy.seen), 1)  # not again

    def test_a_killed_server_s_people_are_lost_then_gone(self):
        one = self.linked_server('--resume-for=6', '--metrics')  # /who must see ben lost
        two = self.linked_server('--resume-for=6')  # within it
        empty = self.linked_server()  # no one on it
        ann, ben = self.join(one, 'ann'), self.join(two, 'ben')
        self.everyone_knows([ann, ben], 2)
        wait_until(lambda: link_figures(one) == {'up': 1, 'servers': 2}, 'one to hear both')
        ben.send('last words\n')
        ann.expect(r'^<ben> last words$')
        two.proc.kill()
        empty.proc.kill()
        ann.expect(r'^-!- ben lost the connection$', timeout=chat.LINK_DEAD_SEC + 15)
        ann.send('/who\n')
        ann.expect(r'^-!- 2 online in #lobby: ann, ben \(lost\)$')
        ann.expect(r'^-!- ben left \(connection lost\)$')
        self.everyone_knows([ann], 1)  # no ghost
        wait_until(lambda: link_figures(one) == {'up': 1, 'servers': 0},
                   'one to forget both servers')  # nor a dead server kept (empty's beats
        # may have stopped up to LINK_BEAT_SEC after two's)
        three = self.linked_server()
        self.join(three, 'ben')  # the name is free again
        ann.expect(came('ben'))

    def test_a_client_resumes_on_another_server_without_missing_a_line(self):
        one, two, three = self.three()
        token, ann, ben, cat, dan = self.met((one, 'ann'), (two, 'ben'), (three, 'cat'),
                                             (one, 'dan'))
        ben.send('before\n/msg ann private before\n')
        ann.expect(r'^<ben> before$')  # heard: 1 public line since the token
        ann.expect(r'^\[PM from ben\] private before$')  # and 2 private messages:
        dan.send('/msg ann from next door\n')  # one from someone on its own server
        ann.expect(r'^\[PM from dan\] from next door$')
        one.proc.kill()  # kill -9: no goodbye
        ben.send('while away 1\nwhile away 2\n')
        cat.expect(r'^<ben> while away 2$')
        cat.send('/msg ann private while away\n/msg ben read on\n')
        cat.expect(r'^\[PM to ann\] private while away$')
        ben.expect(r'^\[PM from cat\] read on$')  # so ben's server has read the first too
        back = self.resume(two, 'ann', '/resume %s 9 1 2' % token)  # ben's server: cat's
        # message went on the bus
        back.expect(r'^-!- You are back as ann in #lobby: 3 lines you missed$')
        self.assertEqual([back.line(), back.line(), back.line()],
                         ['<ben> while away 1', '<ben> while away 2',
                          '[PM from cat] private while away'])
        back.expect(RESUME_LINE)
        back.send('back on two\n')
        for conn in (ben, cat):
            conn.expect(r'^<ann> back on two$')
        cat.send('/whois ann\n')
        cat.expect(r'^-!- ann: in #lobby, on another server$')
        self.everyone_knows([back, ben, cat], 4)  # one ann, no ghost (and dan: his server
        # is not yet taken for dead)
        again = self.resume(three, 'ann', '/resume %s' % token)  # the old token is spent
        again.expect(r'^!!! cannot resume: no such session')

    def test_private_messages_count_from_the_token_on_a_resume_on_another_server(self):
        one, two = self.linked_server(), self.linked_server()
        token, ann, ben, dan, eve = self.met((one, 'ann'), (two, 'ben'), (two, 'dan'),
                                             (two, 'eve'))  # (in the lobby: not counted)
        ben.send('/msg ann before the join\n')
        ann.expect(r'^\[PM from ben\] before the join$')
        ann.send('/join side\n')  # its client counts room lines from here on, not private ones
        ben.send('/join side\n/msg ann after the join\n')
        ann.expect(r'^\[PM from ben\] after the join$')
        cut(ann)
        ben.expect(r'^-!- ann lost the connection$')
        ben.send('/msg ann while lost\n')
        ben.expect(r'^-!- ann lost the connection: it gets this if it comes back$')
        dan.send('sync\n')  # said on two after ben's message went to Redis:
        eve.expect(r'^<dan> sync$')  # so two has read that message back
        back = self.resume(two, 'ann', '/resume %s 9 0 2' % token)  # no room line since
        # the join; 2 private
        back.expect(r'^-!- You are back as ann in #side: 1 line you missed$')
        self.assertEqual(back.line(), '[PM from ben] while lost')

    def test_a_resume_without_counts_on_another_server_gets_what_came_after_the_loss(self):
        one, two = self.linked_server(), self.linked_server()
        token, ann, ben, cat = self.met((one, 'ann'), (two, 'ben'), (two, 'cat'))
        ben.send('before\n/msg ann pm before\n')
        ann.expect(r'^<ben> before$')
        ann.expect(r'^\[PM from ben\] pm before$')
        cut(ann)
        ben.expect(r'^-!- ann lost the connection$')
        ben.send('/msg ann pm after\nafter\n')
        cat.expect(r'^<ben> after$')  # so two has read the message back from Redis
        back = self.resume(two, 'ann', '/resume %s' % token)  # as typed: no counts
        back.expect(r'^-!- You are back as ann in #lobby: 2 lines you missed$')
        self.assertEqual([back.line(), back.line()], ['<ben> after', '[PM from ben] pm after'])

    def test_a_resume_elsewhere_after_lines_heard_while_the_link_was_down(self):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        two = self.linked_server()
        token, ann, dan, ben, cat = self.met((one, 'ann'), (one, 'dan'), (two, 'ben'),
                                             (two, 'cat'))
        proxy.refusing = True
        proxy.cut()
        ann.expect(r'^-!- the link to the other servers is down')
        dan.send('local\n/msg ann local pm\n')  # on one only: never on the bus
        ann.expect(r'^<dan> local$')
        ann.expect(r'^\[PM from dan\] local pm$')
        proxy.refusing = False
        ann.expect(r'^-!- linked again$')
        self.everyone_knows([ben], 4)
        cut(ann)  # its client counts 1 line and 1 message: not what two can count
        ben.expect(r'^-!- ann lost the connection$')
        ben.send('/msg ann pm after\nafter\n')
        cat.expect(r'^<ben> after$')  # so two has read them back from Redis
        back = self.resume(two, 'ann', '/resume %s 9 1 1' % token)
        back.expect(r'^-!- You are back as ann in #lobby: 2 lines you missed$')
        self.assertEqual([back.line(), back.line()], ['<ben> after', '[PM from ben] pm after'])

    def test_a_server_linked_after_another_died_learns_of_its_people_as_they_resume(self):
        one, two = self.linked_server(), self.linked_server()
        token, ann, ben = self.met((one, 'ann'), (two, 'ben'))
        one.proc.kill()  # kill -9: three, linked after, never hears of ann from one
        three = self.linked_server()
        cat = self.join(three, 'cat')
        self.everyone_knows([cat], 2)  # ben and cat
        back = self.resume(two, 'ann', '/resume %s' % token)
        back.expect(r'^-!- You are back as ann')
        self.everyone_knows([cat], 3)
        cat.send('/msg ann hi\n')
        cat.expect(r'^\[PM to ann\] hi$')
        back.expect(r'^\[PM from cat\] hi$')
        dan = self.join(three, 'dan')
        dan.send('/nick ann\n')
        dan.expect(r'^!!! .*the name is taken by ann$')

    def test_a_lost_person_back_on_another_server_is_back_on_its_old_one_too(self):
        one, two = self.linked_server(), self.linked_server()
        token, ann, dan, ben = self.met((one, 'ann'), (one, 'dan'), (two, 'ben'))
        cut(ann)
        for conn in (dan, ben):
            conn.expect(r'^-!- ann lost the connection$')
        back = self.resume(two, 'ann', '/resume %s' % token)
        back.expect(r'^-!- You are back as ann in #lobby')
        for conn in (ben, dan):
            conn.expect(r'^-!- ann is back$')

    def test_a_resume_on_another_server_keeps_whom_the_person_ignores(self):
        one, two = self.linked_server(), self.linked_server()
        token, bob, amy, carl = self.met((two, 'bob'), (one, 'amy'), (one, 'carl'))
        bob.send('/ignore carl\n')
        bob.expect(r'^-!- You ignore carl')
        for conn, line, hearer in ((amy, 'a1', carl), (carl, 'c1', amy), (amy, 'a2', bob)):
            conn.send(line + '\n')
            hearer.expect(r'^<%s> %s$' % (conn.name, line))  # one after another
        cut(bob)  # it heard 2 lines: a1 and a2
        amy.expect(r'^-!- bob lost the connection$')
        carl.send('/msg bob psst\n')
        carl.expect(r'^\[PM to bob\] psst$')
        for conn, line, hearer in ((carl, 'c2', amy), (amy, 'a3', carl)):
            conn.send(line + '\n')
            hearer.expect(r'^<%s> %s$' % (conn.name, line))
        back = self.resume(one, 'bob', '/resume %s 9 2 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby: 1 line you missed$')
        self.assertEqual(back.line(), '<amy> a3')
        back.send('/ignore\n')
        back.expect(r'^-!- You ignore carl$')

    def test_a_resume_on_another_server_counts_only_what_was_ignored_while_it_was(self):
        one, two = self.linked_server(), self.linked_server()
        token, bob, amy, carl = self.met((two, 'bob'), (one, 'amy'), (one, 'carl'))

        def say(conn, line, hearer=None):  # hearer hears it, after all said before
            conn.send(line + '\n')
            (hearer or bob).expect(r'^<%s> %s$' % (conn.name, line))
        say(amy, 'a1')
        bob.send('/ignore carl\n')
        bob.expect(r'^-!- You ignore carl')
        say(carl, 'c1', amy)
        say(amy, 'a2')  # (so c1 has reached bob's server, unheard)
        bob.send('/unignore carl\n')
        bob.expect(r'^-!- You hear carl again$')
        say(carl, 'c2')
        bob.send('/ignore amy\n')
        bob.expect(r'^-!- You ignore amy')
        say(amy, 'a3', carl)
        say(carl, 'c3')
        cut(bob)  # it heard 4 lines: a1, a2, c2 and c3
        amy.expect(r'^-!- bob lost the connection$')
        say(amy, 'a4', carl)
        say(carl, 'c4', amy)
        for conn, text in ((amy, 'psst'), (carl, 'hi')):
            conn.send('/msg bob %s\n' % text)
            conn.expect(r'^\[PM to bob\] %s$' % text)
        say(amy, 'a5', carl)  # (so one has read the messages back from Redis)
        back = self.resume(one, 'bob', '/resume %s 9 4 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby: 2 lines you missed$')
        self.assertEqual([back.line(), back.line()], ['<carl> c4', '[PM from carl] hi'])

    def test_a_muted_person_is_still_muted_after_a_resume_on_another_server(self):
        one = self.linked_server('--op-password-file', self.op_file())
        two = self.linked_server()
        token, bob, op = self.met((two, 'bob'), (one, 'op'))
        op.send('/op opsecret\n/mute bob\n')
        bob.expect(r'^!!! you are muted by op')
        cut(bob)
        op.expect(r'^-!- bob lost the connection$')
        back = self.resume(one, 'bob', '/resume %s' % token)
        back.expect(r'^-!- You are back as bob')
        back.send('still here\n')
        back.expect(r'^!!! you are muted by op')
        op.send('/unmute bob\n')
        back.expect(r'^-!- op lets you speak again$')
        back.send('free again\n')
        before, _ = op.expect(r'^<bob> free again$')
        self.assertNotIn('<bob> still here', before)

    def test_someone_ignored_who_renames_while_the_ignorer_is_away_stays_ignored(self):
        one, two = self.linked_server(), self.linked_server()
        token, bob, dan, carl = self.met((two, 'bob'), (two, 'dan'), (one, 'carl'))
        bob.send('/ignore carl\n')
        bob.expect(r'^-!- You ignore carl')
        carl.send('x1\n')
        dan.expect(r'^<carl> x1$')
        cut(bob)
        dan.expect(r'^-!- bob lost the connection$')
        carl.send('/nick carlos\nx2\n')
        dan.expect(r'^<carlos> x2$')
        back = self.resume(one, 'bob', '/resume %s 9 0 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby: 0 lines you missed$')
        back.send('/ignore\n')
        back.expect(r'^-!- You ignore carlos$')

    def test_an_ignore_still_on_outlasts_the_bound_on_those_that_ended(self):
        one, two = self.linked_server(), self.linked_server('--rate', '0')
        token, bob, dan, carl = self.met((two, 'bob'), (two, 'dan'), (one, 'carl'))
        bob.send('/ignore carl\n' + '/ignore dan\n/unignore dan\n' * (
            chat.SESSION_MAX_ENDED_IGNORES + 1))
        for _ in range(chat.SESSION_MAX_ENDED_IGNORES + 1):
            bob.expect(r'^-!- You hear dan again$')
        cut(bob)
        dan.expect(r'^-!- bob lost the connection$')
        carl.send('c1\n')
        dan.expect(r'^<carl> c1$')
        back = self.resume(one, 'bob', '/resume %s 9 0 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby: 0 lines you missed$')

    def test_an_unignore_holds_on_a_resume_back_on_the_first_server(self):
        one, two = self.linked_server(), self.linked_server()
        token, bob, carl = self.met((two, 'bob'), (one, 'carl'))
        bob.send('/ignore carl\n')
        bob.expect(r'^-!- You ignore carl')
        cut(bob)
        carl.expect(r'^-!- bob lost the connection$')
        back = self.resume(one, 'bob', '/resume %s' % token)
        token = back.expect(RESUME_LINE)[1].group(1)
        back.send('/unignore carl\n')
        back.expect(r'^-!- You hear carl again$')
        cut(back)
        carl.expect(r'^-!- bob lost the connection$')
        again = self.resume(two, 'bob', '/resume %s' % token)  # where bob ignored carl
        again.expect(r'^-!- You are back as bob')
        again.send('/ignore\n')
        again.expect(r'^-!- You ignore no one$')
        carl.send('hello bob\n')
        again.expect(r'^<carl> hello bob$')

    def test_an_ignore_that_ended_as_its_person_left_is_not_taken_to_another_server(self):
        one, two = self.linked_server(), self.linked_server()
        token, bob, carl, eve = self.met((two, 'bob'), (one, 'carl'), (one, 'eve'))
        bob.send('/ignore carl\n')
        bob.expect(r'^-!- You ignore carl')
        carl.send('/quit\n')
        self.gone(bob, 'carl')
        carl = self.join(one, 'carl')  # someone else, by the same name
        carl.send('n1\n')
        bob.expect(r'^<carl> n1$')
        cut(bob)
        carl.expect(r'^-!- bob lost the connection$')
        carl.send('n2\n')
        eve.expect(r'^<carl> n2$')  # so one has read it back from Redis
        back = self.resume(one, 'bob', '/resume %s 9 1 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby: 1 line you missed$')
        self.assertEqual(back.line(), '<carl> n2')
        carl.send('n3\n')
        back.expect(r'^<carl> n3$')

    def test_a_private_message_back_from_redis_after_its_recipient_resumed_here_reaches_it(self):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        two = self.linked_server()
        token, bob, carl = self.met((two, 'bob'), (one, 'carl'))
        cut(bob)
        carl.expect(r'^-!- bob lost the connection$')
        proxy.hold = b'held back'  # its way back to one, on the bus
        carl.send('/msg bob held back\n')
        carl.expect(r'^\[PM to bob\] held back$')
        wait_until(lambda: proxy.held, 'the message on its way back')
        back = self.resume(one, 'bob', '/resume %s 0 0 0' % token)
        back.expect(r'^-!- You are back as bob in #lobby')
        proxy.release()
        back.expect(r'^\[PM from carl\] held back$')
        carl.send('/msg bob after\n')
        before, _ = back.expect(r'^\[PM from carl\] after$')
        self.assertNotIn('[PM from carl] held back', before)

    def test_unreachable_redis_at_start_is_one_clear_line_unless_optional(self):
        port = free_port()
        result = run_chat('server', '0', '--host', '127.0.0.1', '--redis',
                          'redis://127.0.0.1:%d' % port)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip().splitlines(), [
            'chat.py: error: cannot reach Redis at 127.0.0.1:%d: Connection refused' % port])
        self.assertNotIn('Traceback', result.stderr)
        alone = ServerProcess('--redis', 'redis://127.0.0.1:%d' % port, '--redis-optional')
        self.addCleanup(alone.stop)
        alone.wait_log(r'cannot reach Redis .*alone until it can be reached')
        ann = self.join(alone, 'ann')
        ann.send('hello\n/who\n')
        ann.expect(r'^-!- 1 online')
        RedisServer(self, port=port)
        alone.wait_log(r'link: linked through Redis')
        other = self.linked_server(url='redis://127.0.0.1:%d' % port)
        ben = self.join(other, 'ben')
        self.everyone_knows([ann, ben], 2)

    def test_redis_that_wants_a_password(self):
        self.redis = RedisServer(self, '--requirepass', 's3cret@x')
        for url, said in (('redis://127.0.0.1:%d', 'NOAUTH'),
                          ('redis://:wrong@127.0.0.1:%d', 'WRONGPASS')):
            result = run_chat('server', '0', '--host', '127.0.0.1', '--redis',
                              url % self.redis.port)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertRegex(result.stderr.strip(), r'^chat.py: error: Redis at 127.0.0.1:\d+ '
                             r'refused: %s' % said)
        url = 'redis://:s3cret%%40x@127.0.0.1:%d' % self.redis.port  # from the environment:
        one = self.linked_server(url='', env=dict(os.environ, CHAT_REDIS_URL=url))
        two = self.linked_server(url=url)
        self.assertNotIn('s3cret', ' '.join(one.proc.args))
        ann, ben = self.join(one, 'ann'), self.join(two, 'ben')
        self.everyone_knows([ann, ben], 2)

    def test_a_redis_user_needs_the_bus_s_channel(self):
        for user, rules in (('keys', ['~chat:*']), ('chat', ['~chat:*', '&chat:*'])):
            self.redis.command('ACL', 'SETUSER', user, 'on', '>pw', '+@all', *rules)
        result = run_chat('server', '0', '--host', '127.0.0.1', '--redis',
                          'redis://keys:pw@127.0.0.1:%d' % self.redis.port)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertRegex(result.stderr.strip(), r'^chat.py: error: Redis at 127.0.0.1:\d+ '
                         r'refused the channel chat:bus@0: NOPERM ')
        url = 'redis://chat:pw@127.0.0.1:%d' % self.redis.port
        one, two = self.linked_server(url=url), self.linked_server(url=url)
        ann, ben = self.join(one, 'ann'), self.join(two, 'ben')
        self.everyone_knows([ann, ben], 2)
        ann.send('with its own keys and channel\n')
        ben.expect(r'^<ann> with its own keys and channel$')

    def test_rediss_speaks_tls_to_redis_and_checks_its_certificate(self):
        cert, key, _ = certificate()
        port = free_port()
        self.redis = RedisServer(self, '--port', '0', '--tls-port', str(port), '--tls-cert-file',
                                 cert, '--tls-key-file', key, '--tls-auth-clients', 'no',
                                 '--bind', '127.0.0.1', '::1', port=port, tls=True)
        url = 'rediss://localhost:%d' % port
        result = run_chat('server', '0', '--host', '127.0.0.1', '--redis', url)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr.strip(), r'^chat.py: error: cannot speak TLS with Redis '
                         r'at localhost:\d+: CERTIFICATE_VERIFY_FAILED$')
        one = self.linked_server('--redis-cafile', cert, url=url)
        two = self.linked_server('--redis-cafile', cert, url=url)
        ann, ben = self.join(one, 'ann'), self.join(two, 'ben')
        self.everyone_knows([ann, ben], 2)
        ann.send('over TLS\n')
        ben.expect(r'^<ann> over TLS$')

    def test_two_clusters_share_one_redis_unheard(self):
        red = self.linked_server('--cluster', 'red')
        blue = self.linked_server('--cluster', 'blue')
        ann, ben = self.join(red, 'ann'), self.join(blue, 'ann')  # one name, two chats
        for conn in (ann, ben):
            self.everyone_knows([conn], 1)
        ann.send('in red\n')
        ben.send('/who\n')
        before, _ = ben.expect(r'^-!- 1 online')
        self.assertNotIn('<ann> in red', before)

    def test_operators_kick_mute_and_wall_across_servers(self):
        args = ('--op-password-file', self.op_file())
        one, two = self.linked_server(*args), self.linked_server(*args)
        boss, ben, cat = self.join(one, 'boss'), self.join(two, 'ben'), self.join(two, 'cat')
        self.everyone_knows([boss, ben, cat], 3)
        boss.send('/op opsecret\n')
        boss.expect(r'^-!- boss is now an operator$')
        wait_until(lambda: self.whois(cat, 'boss') == '-!- boss: in #lobby, on another '
                   'server, operator', 'the other server to know boss is an operator')
        boss.send('/mute ben\n')
        boss.expect(r'^-!- ben is muted$')
        ben.expect(r'^!!! you are muted by boss')
        ben.send('still here\n')
        ben.expect(r'^!!! you are muted by boss')
        boss.send('/wall to everyone\n')
        for conn in (boss, ben, cat):
            conn.expect(r'^-!- boss to everyone: to everyone$')
        boss.send('/kick ben bye now\n')
        ben.expect(r'^!!! you were kicked by boss: bye now$')
        for conn in (boss, cat):
            conn.expect(r'^-!- ben left \(kicked by boss: bye now\)$')

    def test_a_first_link_that_breaks_as_the_rooms_load_loads_them_at_the_next(self):
        ann = self.join(self.linked_server(), 'ann')
        ann.send('said before two started\n')
        wait_until(lambda: self.redis.command('XLEN', 'chat:history:lobby') == 1,
                   'the line in Redis')
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        proxy.trip = b'chat:history:lobby'  # the room's history, asked for as two links
        two = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        self.assertIsNone(proxy.trip)
        two.wait_log(r'link: lost Redis')
        self.assertEqual(history_of(self.join(two, 'ben')), ['<ann> said before two started'])

    def test_lines_said_while_a_first_link_was_down_come_after_those_loaded_later(self):
        ann = self.join(self.linked_server(), 'ann')
        ann.send('said before two started\n')
        wait_until(lambda: self.redis.command('XLEN', 'chat:history:lobby') == 1,
                   'the line in Redis')
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        proxy.trip = b'chat:history:lobby'
        proxy.refuse_after_trip = True  # the next try, half a second on, is refused
        two = ServerProcess('--redis', 'redis://127.0.0.1:%d' % proxy.port)
        self.addCleanup(two.stop)
        wait_until(lambda: proxy.trip is None, 'the first link to break')
        ben = self.join(two, 'ben')  # (after the link broke: not told it is down)
        ben.send('said while apart\n')
        self.assertEqual(history_of(ben), ['<ben> said while apart'])
        proxy.refusing = False
        two.wait_log(r'link: linked through Redis')
        self.assertEqual(history_of(ben), ['<ann> said before two started',
                                           '<ben> said while apart'])

    def test_rooms_whose_keys_in_redis_are_damaged_are_loaded_without_them(self):
        self.redis.command('SET', 'chat:topics', 'not a hash')
        self.redis.command('HSET', 'chat:room-names', 'dev', 'dev')
        self.redis.command('SET', 'chat:history:dev', 'not a stream')
        one = self.linked_server()  # linked once the rooms are loaded: not stuck retrying
        self.assertNotIn('link: lost Redis', '\n'.join(one.logs))
        ann = self.join(one, 'ann')
        ann.send('/join dev\n')
        ann.expect(r'^-!- You are in #dev')
        self.assertEqual(history_of(ann), [])

    def test_a_topic_counts_as_said_in_its_room_in_redis_too(self):
        most = chat.LINK_ROOMS_MAX
        one = self.linked_server('--rate', '0')
        ann, ben = self.join(one, 'ann'), self.join(one, 'ben')
        ann.send(rooms_said_in(range(most))  # r0 to r1999: as many as Redis keeps
                 + '/join #r0\n/topic kept fresh\n'  # r0, the oldest, is said in now
                 + '/join #extra\n/topic a new room\n'  # one too many, and with
                 + '/join #lobby\nback\n')  # the lobby two: r1 goes first (of rooms
        # said in in the same millisecond, Redis takes the first by name)
        ben.expect(r'^<ann> back$')
        self.assertEqual(self.redis.command('ZCARD', 'chat:rooms-said'), most)
        self.assertEqual([self.redis.command('EXISTS', 'chat:history:r%d' % i)
                          for i in (0, 1)], [1, 0])
        self.assertEqual([self.redis.command('HEXISTS', 'chat:topics', room)
                          for room in ('r0', 'extra')], [1, 1])
        cat = self.join(self.linked_server(), 'cat')
        cat.send('/join #r0\n')
        cat.expect(r'^-!- Topic of #r0: kept fresh$')

    def test_rooms_are_kept_up_to_a_bound_here_and_in_redis(self):
        most = chat.LINK_ROOMS_MAX
        one = self.linked_server('--rate', '0')
        ann, ben = self.join(one, 'ann'), self.join(one, 'ben')
        ann.send('/join #r0\n/topic set in r0\n'  # back from Redis after ann left, as
                 + rooms_said_in(range(1, most + 2))
                 + '/join #lobby\nback\n')  # each line is: two rooms too many
        ben.expect(r'^<ann> back$')  # after the others, in the bus's order
        ann.send('/rooms\n/join #r1\n/join #r3\n/join #lobby\n')
        ann.expect(r'^-!- %d rooms,' % (most + 1))  # 2,000 of r0 to r2001, and the lobby
        before, _ = ann.expect(r'\] <ann> said in r3$')
        # r1 was said in first: it went, and one more, r0 or r2 (r0's topic counts
        # from when it came back from Redis, which may be a second after r1's line)
        self.assertNotIn('<ann> said in r1', before)
        self.assertEqual(self.redis.command('ZCARD', 'chat:rooms-said'), most)
        self.assertEqual(self.redis.command('HLEN', 'chat:room-names'), most)
        self.assertEqual([self.redis.command('EXISTS', 'chat:history:r%d' % i)
                          for i in (1, most + 1)], [0, 1])
        self.assertEqual(self.redis.command('HEXISTS', 'chat:topics', 'r0'), 0)
        cat = self.join(self.linked_server(), 'cat')  # linked once it has loaded what
        cat.send('/rooms\n')  # Redis keeps, the lobby among them (said in)
        cat.expect(r'^-!- %d rooms\b' % most)

    def test_a_person_of_another_server_may_move_into_the_oldest_room_kept_there(self):
        one, two = self.linked_server('--rate', '0'), self.linked_server()
        ann, cat = self.join(one, 'ann'), self.join(two, 'cat')
        self.everyone_knows([ann, cat], 2)
        # Both servers keep the most rooms no one is in, r0 to r1999, as ann
        # leaves the last; then #start empties as she goes into r0, the oldest.
        ann.send(rooms_said_in(range(chat.LINK_ROOMS_MAX)) + '/join #start\nin start\n'
                 '/join #r0\n/msg cat moved\n')
        cat.expect(r'^\[PM from ann\] moved$')  # after the move, in the bus's order
        cat.send('/join #r0\n')
        cat.expect(r'^-!- 2 online in #r0: ann, cat$')

    def test_a_topic_that_comes_back_after_its_setter_left_is_kept_at_the_bound(self):
        one = self.linked_server('--rate', '0')
        ann, ben = self.join(one, 'ann'), self.join(one, 'ben')
        ann.send(rooms_said_in(range(chat.LINK_ROOMS_MAX))  # the most kept, as ann leaves
                 + '/join #fresh\n/topic brand new\n/join #lobby\nback\n')  # the last
        ben.expect(r'^<ann> back$')  # so the topic came back, after ann left #fresh
        ben.send('/join #fresh\n')
        ben.expect(r'^-!- Topic of #fresh: brand new$')  # the newest: r0 went instead

    def test_without_history_a_room_no_one_is_in_goes_even_if_its_lines_come_later(self):
        one = self.linked_server('--rate', '0', '--history', '0')
        ann, ben = self.join(one, 'ann'), self.join(one, 'ben')
        ann.send(rooms_said_in(range(50))
                 + '/join #lobby\nback\n')  # each line comes back from Redis after ann left
        ben.expect(r'^<ann> back$')  # after the others, in the bus's order
        ben.send('/rooms\n')
        ben.expect(r'^-!- 1 room:$')

    def test_redis_knows_a_room_by_its_key_however_it_is_spelt(self):
        ann, ben = self.join(self.linked_server(), 'ann'), self.join(self.linked_server(), 'ben')
        ann.send('/join #Rust\nin Rust\n')
        ben.send('/join #rust\n')  # the room may be called either here, as ben came first
        ben.expect(r'<ann> in Rust$')  # (or as a line of its history)
        ben.send('in rust\n')
        ann.expect(r'^<ben> in rust$')
        self.assertEqual(self.redis.command('ZRANGE', 'chat:rooms-said', 0, -1), [b'rust'])
        self.assertEqual(self.redis.command('HKEYS', 'chat:room-names'), [b'rust'])

    def test_bans_hold_on_every_server(self):
        args = ('--op-password-file', self.op_file())
        one, two = self.linked_server(*args), self.linked_server(*args)
        boss, ben, cat = self.join(one, 'boss'), self.join(two, 'ben'), self.join(two, 'cat')
        self.everyone_knows([boss, ben, cat], 3)
        boss.send('/op opsecret\n/ban ben 5\n')
        ben.expect(r'^!!! you were banned by boss$')
        boss.expect(r'^-!- boss banned ben by name \(a shared address\) for 5 minutes$')
        self.gone(boss, 'ben')
        again = Conn(one.port)  # the name is banned on the other server too
        self.addCleanup(again.close)
        again.expect(r'^-!- \d+ online')
        again.send('/nick ben\n')
        again.expect(r'^!!! cannot use the name ben: the name is banned until')
        boss.send('/ban 127.0.0.2\nafter the ban\n')
        boss.expect(r'^-!- boss banned 127\.0\.0\.2 until lifted$')  # kept in Redis
        cat.expect(r'^<boss> after the ban$')  # so the ban, before it, is known there
        is_closed_at_once(self, two.port, '127.0.0.1', r'^!!! you are banned', '127.0.0.2')
        three = self.linked_server(*args)  # linked after the bans: it has them too
        late = self.join(three, 'late')
        late.send('/nick ben\n')
        late.expect(r'^!!! cannot use the name ben: the name is banned until \d\d:\d\d$')
        is_closed_at_once(self, three.port, '127.0.0.1', r'^!!! you are banned until lifted$',
                          '127.0.0.2')
        boss.send('/unban 127.0.0.2\n/unban ben\nafter the unbans\n')
        cat.expect(r'^<boss> after the unbans$')
        back = Conn(self.linked_server(*args).port, source='127.0.0.2')  # linked after
        self.addCleanup(back.close)
        back.expect(r'^-!- \d+ online')
        back.send('/nick ben\n')
        back.expect(r'is now known as ben$')
        also = Conn(two.port, source='127.0.0.2')
        self.addCleanup(also.close)
        also.expect(r'^-!- \d+ online')

    def test_a_redis_emptied_while_linked_is_given_back_what_the_servers_hold(self):
        one = self.linked_server('--op-password-file', self.op_file())
        ann, mallory = self.join(one, 'ann'), self.join(one, 'mallory')
        ann.send('/op opsecret\n/ban mallory 5\n')
        ann.expect(r'^-!- ann banned mallory')
        wait_until(lambda: self.redis.command('HLEN', 'chat:bans') == 1, 'the ban in Redis')
        self.redis.command('FLUSHALL')  # no link breaks: the next beat finds it out
        wait_until(lambda: self.redis.command('HLEN', 'chat:bans') == 1, 'the ban given back',
                   timeout=2 * chat.LINK_BEAT_SEC + TIMEOUT)
        one.wait_log(r'link: Redis at \S+ lost what it held; giving it back$')
        self.assertTrue(self.redis.command('KEYS', 'chat:session:*'))  # ann's, to resume
        late = self.join(self.linked_server(), 'late')
        late.send('/nick mallory\n')
        late.expect(r'^!!! cannot use the name mallory: the name is banned')

    def test_a_registered_name_is_its_owners_on_every_server(self):
        one, two = self.linked_server(), self.linked_server()  # no --data: Redis keeps it
        ann, watcher = self.join(one, 'ann'), self.join(two, 'watcher')
        ann.send('/register correct horse\n')
        ann.expect(r'^-!- The name ann is yours')
        ann.send('registered\n')
        watcher.expect(r'^<ann> registered$')  # so two has read the registration, before it
        ann.send('/quit\n')
        ann.expect_closed()
        for server, name in ((two, 'other'), (self.linked_server(), 'late')):  # linked after
            other = self.join(server, name)
            other.send('/nick ann\n')
            other.expect(r'^!!! cannot use the name ann: it is registered; give its '
                         r'password: /nick ann PASSWORD$')
        anyone = self.join(one, 'anyone')
        other.send('/nick ann correct horse\n')
        other.expect(r'^-!- late is now known as ann$')
        other.send('/unregister\n')
        other.expect(r'^-!- ann is no longer registered$')
        other.send('/nick late\nlet go\n')
        anyone.expect(r'^<late> let go$')  # so the unregistering, before it, is known there
        anyone.send('/nick ann\n')
        anyone.expect(r'^-!- anyone is now known as ann$')

    def test_a_message_for_a_registered_name_waits_for_it_on_any_server(self):
        one, two, three = self.linked_server(), self.linked_server('--rate=0'), self.linked_server()
        ann = self.join(one, 'ann')
        ann.send('/register correct horse\n')
        ann.expect(r'^-!- The name ann is yours')
        ann.send('/quit\n')
        ann.expect_closed()
        ben = self.join(two, 'ben')
        self.gone(ben, 'ann')
        ben.send(''.join('/msg ann message %d\n' % n for n in range(chat.MAIL_PER_NAME + 1)))
        ben.expect(r'^\[PM to ann\] message 0$')
        ben.expect(r'^-!- ann is not here: the message waits for them \(up to 7 days\)$')
        ben.expect(r'^!!! ann has %d messages waiting already: this one is not kept$'
                   % chat.MAIL_PER_NAME)
        back = self.join(three, 'guest')
        back.send('/nick ann correct horse\n')
        back.expect(r'^-!- %d messages waited for you:$' % chat.MAIL_PER_NAME)
        for n in range(chat.MAIL_PER_NAME):
            self.assertRegex(back.line(), r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] '
                                          r'\[PM from ben\] message %d$' % n)
        self.assertEqual(self.redis.command('EXISTS', 'chat:mail:ann'), 0)  # handed out once

    def test_an_unban_made_while_a_server_was_cut_off_holds_when_it_is_back(self):
        args = ('--op-password-file', self.op_file())
        one, two = self.linked_server(*args), self.linked_server(*args)
        boss, watcher = self.join(two, 'boss'), self.join(one, 'watcher')
        boss.send('/op opsecret\n/ban 127.0.0.2 5\nafter the ban\n')
        watcher.expect(r'^<boss> after the ban$')
        one.proc.send_signal(signal.SIGSTOP)  # one is cut off: it holds the ban...
        self.addCleanup(one.proc.send_signal, signal.SIGCONT)
        self.redis.command('CLIENT', 'KILL', 'TYPE', 'normal')
        boss.expect(r'^-!- linked again$')
        boss.send('/unban 127.0.0.2\n')  # ...which is lifted meanwhile
        boss.expect(r'^-!- 127\.0\.0\.2 is no longer banned$')
        one.proc.send_signal(signal.SIGCONT)
        watcher.expect(r'^-!- linked again$')
        wait_until(lambda: sum('linked through Redis' in line for line in one.logs) == 2,
                   'one to have read what it links to')
        watcher.send('after the link\n')
        boss.expect(r'^<watcher> after the link$')  # two has read all one said before
        self.assertEqual(self.redis.command('HLEN', 'chat:bans'), 0)  # not given back
        self.assertTrue(welcomed(one.port, '127.0.0.2'))
        self.assertTrue(welcomed(two.port, '127.0.0.2'))

    def test_a_registered_name_taken_where_it_was_not_known_goes_back(self):
        one = self.linked_server()
        ann = self.join(one, 'ann')
        ann.send('/register correct horse\n')
        ann.expect(r'^-!- The name ann is yours')
        ann.send('/quit\n')
        ann.expect_closed()
        self.redis.stop()
        three = ServerProcess('--redis', self.redis.url, '--redis-optional')
        self.addCleanup(three.stop)
        impostor = self.join(three, 'ann')  # three has never heard of the name
        self.redis.start()  # empty: one gives it the names it holds
        impostor.expect(r'^-!- the name ann is registered on another server: you are '
                        r'guest-\d+ now$')
        impostor.send('/nick ann\n')
        impostor.expect(r'^!!! cannot use the name ann: it is registered')

    def test_an_unban_while_the_link_is_down_reaches_the_others_when_it_is_back(self):
        args = ('--op-password-file', self.op_file())
        one, two = self.linked_server(*args), self.linked_server(*args)
        boss = self.join(one, 'boss')
        boss.send('/op opsecret\n/ban 127.0.0.2 5\n')
        boss.expect(r'^-!- boss banned 127\.0\.0\.2 for 5 minutes$')
        wait_until(lambda: self.redis.command('HLEN', 'chat:bans') == 1, 'the ban in Redis')
        self.redis.command('SAVE')  # so it comes back with the ban in it
        self.redis.stop()
        boss.expect(r'^-!- the link to the other servers is down')
        boss.send('/unban 127.0.0.2\n')
        boss.expect(r'^-!- 127\.0\.0\.2 is no longer banned$')
        self.redis.start()
        boss.expect(r'^-!- linked again$')
        wait_until(lambda: self.redis.command('HLEN', 'chat:bans') == 0, 'the ban gone')
        wait_until(lambda: welcomed(two.port, '127.0.0.2'), 'two to let 127.0.0.2 in')
        self.assertTrue(welcomed(one.port, '127.0.0.2'))  # not banned again from Redis

    def read_again_held(self, proxy, two, amy, hold, how):
        """Make two read the shared hashes again, its reply holding hold
        kept back by proxy: how='link' cuts its link (it reads them at the
        next, and hears the bus only after them), how='epoch' makes Redis
        look emptied (it reads them at its next beat, the bus going on)."""
        proxy.hold = hold
        if how == 'link':
            proxy.cut()
            amy.expect(r'^-!- linked again$')
        else:
            self.redis.command('DEL', 'chat:epoch')
            two.wait_log(r'link: Redis at .* lost what it held')
        wait_until(lambda: proxy.held is not None, 'two to read the hashes')

    def an_unban_heard_while_the_bans_are_read_again(self, how):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server('--op-password-file', self.op_file())
        two = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        boss, amy = self.join(one, 'boss'), self.join(two, 'amy')
        self.everyone_knows([boss, amy], 2)
        boss.send('/op opsecret\n/ban 127.0.0.2\n')
        boss.expect(r'^-!- boss banned 127\.0\.0\.2 until lifted$')
        wait_until(lambda: not welcomed(two.port, '127.0.0.2'), 'two to hear of the ban')
        self.read_again_held(proxy, two, amy, b'["127.0.0.2', how)  # the ban in the reply
        boss.send('/unban 127.0.0.2\nunbanned\n')
        if how == 'epoch':  # two has heard the unban, after the read: the bus goes on
            amy.expect(r'^<boss> unbanned$')
        proxy.release()
        if how == 'link':  # the bus waits for the read
            amy.expect(r'^<boss> unbanned$')
        asked = Conn(two.port, hello=False)  # a question to Redis after the bans:
        self.addCleanup(asked.close)
        asked.send('/resume %s\n' % ('x' * 22))
        asked.expect(r'^!!! cannot resume')  # its answer comes after theirs
        self.assertTrue(welcomed(two.port, '127.0.0.2'))
        boss.send('after\n')  # the line came on the channel and from the stream: once
        before, _ = amy.expect(r'^<boss> after$')
        self.assertNotIn('<boss> unbanned', before)

    def test_an_unban_heard_while_the_bans_are_read_at_a_link_is_not_undone_by_them(self):
        self.an_unban_heard_while_the_bans_are_read_again('link')

    def test_an_unban_heard_while_an_emptied_redis_is_read_is_not_undone_by_it(self):
        self.an_unban_heard_while_the_bans_are_read_again('epoch')

    def an_unregistering_heard_while_the_names_are_read_again(self, how):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server()
        two = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        ann, amy = self.join(one, 'ann'), self.join(two, 'amy')
        self.everyone_knows([ann, amy], 2)
        ann.send('/register correct horse\n')
        ann.expect(r'^-!- The name ann is yours')  # (hashed off the loop: lines may pass it)
        ann.send('registered\n')
        amy.expect(r'^<ann> registered$')  # after the name on the bus: two knows it is ann's
        # two's read of the names is held: HGETALL's reply, ann's the one
        # field (the bus's state events hold '["ann", "' too, and may come first)
        self.read_again_held(proxy, two, amy, b'*2\r\n$3\r\nann\r\n$', how)
        ann.send('/unregister\nunregistered\n')
        if how == 'epoch':  # two has heard it, after the read: the bus goes on
            amy.expect(r'^<ann> unregistered$')
        proxy.release()
        if how == 'link':  # the bus waits for the read
            amy.expect(r'^<ann> unregistered$')
        asked = Conn(two.port, hello=False)  # a question to Redis after the names:
        self.addCleanup(asked.close)
        asked.send('/resume %s\n' % ('x' * 22))
        asked.expect(r'^!!! cannot resume')  # its answer comes after theirs
        ann.send('/nick ann2\n')
        ann.expect(r'^-!- ann is now known as ann2$')
        amy.expect(r'^-!- ann is now known as ann2$')
        amy.send('/nick ann\n')  # free: not registered again from the read
        amy.expect(r'^-!- amy is now known as ann$')

    def test_an_unregistering_heard_while_the_names_are_read_at_a_link_is_not_undone(self):
        self.an_unregistering_heard_while_the_names_are_read_again('link')

    def test_an_unregistering_heard_while_an_emptied_redis_is_read_is_not_undone(self):
        self.an_unregistering_heard_while_the_names_are_read_again('epoch')

    def op_file(self):
        folder = tempfile.mkdtemp(prefix='chat-op-')
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, 'op')
        with open(path, 'w') as handle:
            handle.write('opsecret\n')
        return path

    def test_a_newcomer_on_any_server_gets_the_room_s_history(self):
        one, two = self.linked_server(), self.linked_server()
        ann, watcher = self.join(one, 'ann'), self.join(two, 'watcher')
        ann.send('first\nsecond\n')
        watcher.expect(r'^<ann> second$')
        ben = Conn(two.port)
        self.addCleanup(ben.close)
        ben.expect(r'^-!- Last 2 messages:$')
        ben.expect(r'^\[\S+\] <ann> first$')
        ben.expect(r'^\[\S+\] <ann> second$')

    def test_history_and_topics_live_in_redis_for_servers_started_later(self):
        first = self.linked_server()
        ann = self.join(first, 'ann')
        ann.send('/join side\n/topic plans\nline one\n/me nods\n')
        ann.expect(r'^-!- ann set the topic: plans$')
        ann.send('/msg ann sync\n')
        ann.expect(r'^\[PM from ann\] sync$')
        first.finish()  # every server gone: Redis still has it
        later = self.linked_server()
        ben = self.join(later, 'ben')
        ben.send('/rooms\n')
        ben.expect(r'^-!-   #side \(0\): plans$')
        ben.send('/join side\n')
        ben.expect(r'^-!- Topic of #side: plans$')
        ben.expect(r'^-!- Last 2 messages:$')
        ben.expect(r'^\[\S+\] <ann> line one$')
        ben.expect(r'^\[\S+\] \* ann nods$')
        ben.send('/history\n')
        ben.expect(r'^-!- Last 2 messages:$')

    def test_a_bus_connection_gone_silent_starts_the_link_again(self):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server()
        two = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        ann, amy = self.join(one, 'ann'), self.join(two, 'amy')
        self.everyone_knows([ann, amy], 2)
        proxy.hold = b'goes quiet'  # the channel's connection to two: its commands' go on
        ann.send('goes quiet\n')
        wait_until(lambda: proxy.held is not None, 'the line to reach the proxy')
        wait_until(lambda: any(re.search(r'link: lost Redis at \S+: no answer for \d+ s; '
                                         r'trying again', line) for line in two.logs),
                   'the silence to be noticed', timeout=chat.LINK_ANSWER_SEC + 2 * chat.LINK_BEAT_SEC)
        amy.expect(r'^<ann> goes quiet$')  # from the stream, linked again

    def test_a_stalled_redis_holds_input_back_then_the_link_starts_again(self):
        one = self.linked_server('--rate=0', '--op-password-file', self.op_file())
        two = self.linked_server()
        ann, amy, ben = self.join(one, 'ann'), self.join(one, 'amy'), self.join(two, 'ben')
        self.everyone_knows([ann, amy, ben], 3)
        wait_until(lambda: self.who(ann).endswith(': amy, ann, ben'),  # (the count alone
                   'one to know ben by name')  # may be of ben's guest name)
        ann.send('/op opsecret\n')
        ann.expect(r'^-!- ann is now an operator')
        self.redis.proc.send_signal(signal.SIGSTOP)  # alive, but answers nothing
        self.addCleanup(self.redis.proc.send_signal, signal.SIGCONT)
        ann.send('/msg ben are you there\n/topic set while stalled\n/wall stalled wall\n')
        ann.expect(r'^\[PM to ben\] are you there$')
        said = ['%04d %s' % (number, 'x' * 4000) for number in range(100)]  # 400 KB
        sender = threading.Thread(target=ann.send, args=(''.join(l + '\n' for l in said),))
        sender.start()  # held back: what waits for Redis is bounded
        wait_until(lambda: any(re.search(r'link: lost Redis at \S+: no answer for \d+ s; '
                                         r'trying again', line) for line in one.logs),
                   'the stall to be noticed', timeout=chat.LINK_ANSWER_SEC + 2 * chat.LINK_BEAT_SEC)
        amy.expect(r'^-!- the link to the other servers is down')
        amy.expect(r'^-!- ann set the topic: set while stalled$')  # what never came back:
        amy.expect(r'^-!- ann to everyone: stalled wall$')
        self.assertEqual([amy.line()[6:] for _ in said], said)  # heard here, in order
        ann.expect(r'^!!! the link to the other servers broke before your message to ben '
                   r'was confirmed: it may not have gone$')
        sender.join(TIMEOUT)
        self.redis.proc.send_signal(signal.SIGCONT)  # it runs what it had:
        ben.expect(r'^\[PM from ann\] are you there$')  # the others hear it,
        ben.expect(r'^-!- ann to everyone: stalled wall$')
        for conn in (ann, amy):
            conn.expect(r'^-!- linked again$')
        ann.send('after the stall\n')
        ben.expect(r'^<ann> after the stall$')
        before, _ = amy.expect(r'^<ann> after the stall$')  # its own server not again
        self.assertFalse([line for line in before if 'stalled' in line], before)

    def test_bench_spreads_its_clients_over_linked_servers(self):
        one, two = self.linked_server('--rate=0'), self.linked_server('--rate=0')
        result = run_chat('bench', '--servers', '127.0.0.1:%d,127.0.0.1:%d' % (
            one.port, two.port), '--clients', '6', '--senders', '2', '--messages', '50',
            timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('chat.py bench: 127.0.0.1:%d, 127.0.0.1:%d\n' % (one.port, two.port),
                      result.stdout)
        self.assertIn('deliveries: 500 in', result.stdout)  # 2 x 50 to 5 others, lost 0
        self.assertIn('(lost 0)', result.stdout)
        for server in (one, two):  # each had its share of the clients
            server.wait_log(r'guest-\d+ joined from 127\.0\.0\.1')
        bad = run_chat('bench', '--servers', '127.0.0.1', '--clients', '3')
        self.assertEqual((bad.returncode, bad.stderr),
                         (1, 'chat.py: error: bench: --servers takes HOST:PORT,HOST:PORT,...\n'))

    def test_a_room_that_forgot_its_lines_while_empty_tells_no_loss_on_a_resume(self):
        one, two = (self.linked_server('--rate', '0', '--max-backlog', '4096') for _ in 'ab')
        token, ann, ben, cat = self.met((one, 'ann'), (two, 'ben'), (two, 'cat'))
        ann.send('/join r\nsaid in r\n' + ''.join(  # r empties, and forgets its lines as
            '/join k%d\n%s' % (number, ('z' * 1000 + '\n') * 8)  # 10 rooms of 8 KB
            for number in range(10)) + '/join lobby\n')  # empty after it
        ben.expect(r'^-!- ann joined$')  # back in the lobby: two has had it all
        for conn in (ben, cat, ann):
            conn.send('/join r\n')
        self.everyone_knows([ann, ben, cat], 3)  # in r: so two has read all that came before
        cut(ann)  # no line in r since it emptied: the first after it is the one missed
        ben.expect(r'^-!- ann lost the connection$')  # one took the loss before ben's line
        ben.send('said while away\n')
        cat.expect(r'^<ben> said while away$')
        back = self.resume(two, 'ann', '/resume %s' % token)  # from the loss on
        back.expect(r'^-!- You are back as ann in #r: 1 line you missed$')  # none gone
        self.assertEqual(back.line(), '<ben> said while away')

    def test_a_damaged_session_record_refuses_the_resume_and_keeps_the_link(self):
        one, two = self.linked_server(), self.linked_server()
        token, ann, ben = self.met((one, 'ann'), (two, 'ben'))
        cut(ann)
        ben.expect(r'^-!- ann lost the connection$')
        key, = [key for key in self.redis.command('KEYS', 'chat:session:*')
                if self.redis.command('HGET', key, 'name') == b'ann']
        self.redis.command('HSET', key, 'mark', 'not a bus entry')
        back = self.resume(two, 'ann', '/resume %s' % token)
        back.expect(r'^!!! cannot resume: no such session')
        ben.send('still linked\n')
        back.expect(r'^<ben> still linked$')  # in as a newcomer
        self.assertNotIn('internal error', '\n'.join(two.logs))

    def test_a_line_both_caught_up_with_and_heard_live_is_heard_once(self):
        proxy = CuttableProxy(self.redis.port)
        self.addCleanup(proxy.stop)
        one = self.linked_server()
        two = self.linked_server(url='redis://127.0.0.1:%d' % proxy.port)
        ann, amy = self.join(one, 'ann'), self.join(two, 'amy')
        self.everyone_knows([ann, amy], 2)
        proxy.hold = b'$9\r\nsubscribe\r\n'  # two's subscription: it asks the stream after
        proxy.cut()
        amy.expect(r'^-!- linked again$')
        wait_until(lambda: proxy.held is not None, 'two to subscribe')
        ann.send('said meanwhile\n')  # on the channel, held; in the stream
        wait_until(lambda: b'said meanwhile' in proxy.held[1], 'the line to come live')
        proxy.release()
        ann.send('after\n')
        before, _ = amy.expect(r'^<ann> after$')
        self.assertEqual(before.count('<ann> said meanwhile'), 1, before)

    def test_a_bad_event_on_the_bus_is_logged_and_passed_over(self):
        one, two = self.linked_server(), self.linked_server()
        ann, ben = self.join(one, 'ann'), self.join(two, 'ben')
        self.everyone_knows([ann, ben], 2)
        for junk in (b'x', b'abc\tsay\t1', b'abc\tstate\t[[', b'\xff\tin\t\xff',
                     b'abc\tunknown-kind\tx'):  # on the bus as a server puts them
            entry = self.redis.command('XADD', 'chat:bus', '*', 'e', junk)
            self.redis.command('PUBLISH', 'chat:bus@0', entry + b'\t' + junk)
        self.redis.command('PUBLISH', 'chat:bus@0', b'no entry id')
        one.wait_log(r'link: cannot take a state event from abc')
        one.wait_log(r"link: not a bus entry on chat:bus@0: b'no entry id'")
        ann.send('still fine\n')
        ben.expect(r'^<ann> still fine$')


class TestLinkedClients(LinkTests, PageTests, unittest.TestCase):

    def test_nc_the_client_and_the_page_on_three_servers_are_one_room(self):
        one, two, three = self.three()
        nc = ClientProcess(one.port, command=[need('nc'), '127.0.0.1', str(one.port)])
        client = ClientProcess(two.port, '--name', 'cli')
        for process in (nc, client):
            self.addCleanup(lambda process=process: process.proc.poll() is None and (
                process.proc.kill(), process.finish()))
        nc.expect(r'^-!- chat.py here: press Enter')
        nc.send('\n/nick ncuser\n')
        nc.expect(r'is now known as ncuser')
        client.expect(r'^-!- (ncuser joined|\d+ online in #lobby: .*ncuser)')
        browser = self.open_page(three.port, '웹')
        self.wait_state(browser, "['cli', 'ncuser', '웹'].every(n => s.members.includes(n))",
                        'everyone, whichever server, in the page\'s list')
        nc.expect(came('웹'))
        nc.send('hello from nc\n')
        client.expect(r'^<ncuser> hello from nc$')
        self.wait_text(browser, 'hello from nc')
        client.send('hi from the client\n')
        nc.expect(r'^<cli> hi from the client$')
        self.wait_text(browser, 'hi from the client')
        self.type_line(browser, '안녕 from the page')
        nc.expect(r'^<웹> 안녕 from the page$')
        client.expect(r'^<웹> 안녕 from the page$')
        self.assertEqual(browser.console_messages, [])
