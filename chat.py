#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""chat.py: a chat server and client in one file, standard library only.

Copy this file to any machine with Python 3.6 or newer and run

    python3 chat.py server             # listen on port 9090, all interfaces
    python3 chat.py client HOST        # join it (or: nc HOST 9090, telnet HOST 9090)

The protocol is plain UTF-8 lines ending in "\\n" ("\\r\\n" is accepted), so
nc, telnet and socat are clients too.  A line a peer sends is a public
message, or a command when it starts with "/" ("//" says a literal "/").
Every line the server sends starts with a marker that tells its kind:

    <NAME> TEXT          public message        * NAME TEXT     action (/me)
    [PM from NAME] TEXT  private message       [PM to NAME] T  your /msg, sent
    -!- TEXT             notice from the server
    !!! TEXT             error, for you alone

The server is one selectors event loop over nonblocking sockets.  Each peer
has an input buffer (at most MAX_LINE_BYTES of an unfinished line), an output
buffer (a peer whose backlog passes MAX_BACKLOG_BYTES is disconnected), and a
flood budget (RATE_BURST_LINES, then RATE_LINES_PER_SEC; over it the server
stops reading that peer until the budget refills).  Messages broadcast during
one loop turn are encoded once and sent to each peer in one send() call.
Control characters and bidirectional overrides are removed from everything a
peer says before anyone sees it, and the client removes them again.  TLS
(--tls-cert), a room password, address rules and operators run in the same
loop.  On a terminal the client keeps the line being typed intact while
messages scroll above it.  `python3 chat.py bench` measures a server.

The file, top to bottom (each part a "# --- " heading):

    Compatibility             what differs across Pythons and platforms
    Limits and defaults       every number the program uses, with why
    Text protocol             cleaning text, the line kinds, names
    Wire formats              HTTP and WebSocket (sans-I/O), telnet, Redis's
                              RESP2 (sans-I/O)
    Server                    Peer, History, Room (members, notices, the
                              turn's batch), Session (/resume), Gate (who
                              gets in), Worker (password hashes, off the
                              loop), Commands (one cmd_WORD each; /register
                              and waiting messages among them), Server
                              (loop, input, output, sessions), Web (the
                              page, /ws, /metrics); listening sockets, the log
    Durable history           DataLog: --data records, fsync, compaction;
                              PeopleLog: names, waiting messages, sessions
    Link                      --redis: several servers as one chat through
                              Redis (the bus and its events, people on
                              other servers, resuming on another server)
    The web page              PAGE, the browser client
    Client                    Client (reconnects, resumes), PlainScreen
    Terminal line editor      KeyReader, LineEditor, TerminalScreen
    Security                  TLS (certificates, pinning), passwords and
                              their hashes, MOTD
    Bench                     `chat.py bench`
    Command line              the subcommands, their options, main()
"""

# An older Python stops at the first line it cannot parse and prints it: this
# f-string, the one thing here that 2.7 and 3.0-3.5 cannot parse, is that line.
f'chat.py needs Python 3.6 or newer: run it with python3'

import argparse
import base64
import bisect
import calendar
import codecs
import collections
import difflib
import errno
import functools
import getpass
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import os
import queue
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import zlib

__version__ = '1.1.0'


# --- Compatibility -----------------------------------------------------------

try:
    import fcntl     # POSIX only: the --data lock
except ImportError:  # Windows: --data is not locked
    fcntl = None

try:
    import resource  # POSIX only: open-files limit
except ImportError:  # Windows
    resource = None

try:
    import termios   # POSIX only: the terminal line editor
except ImportError:  # Windows: the client falls back to cooked mode
    termios = None

try:
    import ssl       # missing only from Pythons built without OpenSSL
except ImportError:
    ssl = None

# 3.7+: str.isascii.  Encoding is as fast, and checks the same thing.
is_ascii = getattr(str, 'isascii', None) or (lambda text: len(text.encode()) == len(text))

# A nonblocking socket that cannot go on now; for TLS, either direction.
WOULD_BLOCK = (BlockingIOError, InterruptedError) + (
    (ssl.SSLWantReadError, ssl.SSLWantWriteError) if ssl else ())


def send_some(sock, data):
    """Send what a nonblocking socket takes now; how much (0 if it would
    block).  A broken connection raises OSError.  Never an empty send:
    before 3.10, ssl called SSL_write, which fails on zero bytes.

    TLS goes a record (TLS_RECORD_BYTES) at a time: SSL_write of a big
    buffer may put many records on the wire and still report "would block",
    counting none of them, so the caller would think them unsent.  A slice
    that would block is offered again, from the same first byte, next time,
    as OpenSSL requires."""
    if not data:
        return 0
    if ssl is None or not isinstance(sock, ssl.SSLSocket):
        try:
            return sock.send(data)
        except WOULD_BLOCK:
            return 0
    view, sent = memoryview(data), 0
    try:
        while sent < len(view):
            sent += sock.send(view[sent:sent + TLS_RECORD_BYTES])
    except WOULD_BLOCK:
        pass
    return sent


def tls_context(server_side):
    """An SSLContext for a server or a client that speaks TLS 1.2 or newer."""
    if ssl is None:
        raise UserError('this Python has no ssl module')
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    if hasattr(context, 'minimum_version'):  # 3.7+
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    return context


# --- Limits and defaults -----------------------------------------------------

DEFAULT_PORT = 9090
DEFAULT_HISTORY = 20           # public messages replayed to a newcomer
HISTORY_MAX_LINES = 1000       # a room's lines kept for /history (within --max-backlog)
HISTORY_DEFAULT_LINES = 100    # /history without N
KEPT_ROOMS_MAX = 1000          # rooms no one is in kept for their history (--data): past it
                               # the one said in longest ago goes, so a flood of new rooms
                               # cannot grow the server without bound (--redis: LINK_ROOMS_MAX)
MAX_NAME_CHARS = 24
MAX_LINE_BYTES = 4096          # longest line a peer may send (IRC allows 512)
MAX_SPACE_RUN = 8              # spaces in a row in what peers say: enough for code
MAX_MARKS = 4                  # combining marks kept on one letter (Zalgo text has hundreds)
MAX_BACKLOG_BYTES = 256 * 1024  # unsent output before a peer counts as too slow
RATE_BURST_LINES = 20          # lines a peer may send at once ...
RATE_LINES_PER_SEC = 5.0       # ... and then per second; faster input waits
MAX_PER_ADDRESS = 32           # connections at once from one host, loopback aside

# The event loop.  Left alone, Linux lets a socket's send buffer grow to
# 4 MiB, which would hide a slow reader from MAX_BACKLOG_BYTES and spend
# kernel memory no cap accounts for.  A turn sends at most max_backlog /
# TURN_SHARE to a room.  Over several turns, backpressure: while a member
# has more than max_backlog / BEHIND_SHARE unsent, its room's input waits
# (for BEHIND_GRACE_SEC at most, then a reader that still lags is on its
# own), so a reader that keeps up is never cut off by a burst.
READ_CHUNK_BYTES = 16 * 1024   # one recv() per peer per loop turn
SEND_BUFFER_BYTES = 64 * 1024  # the kernel's share of a peer's backlog
TLS_RECORD_BYTES = 16 * 1024   # TLS is sent a record at a time (see send_some)
TURN_SHARE = 4
BEHIND_SHARE = 2
BEHIND_GRACE_SEC = 2.0         # so a reader must drain 64 KiB in 2 s: 32 KB/s
NUDGE_SEC = 0.05               # a /msg to a member that lags holds its sender this long
ACCEPTS_PER_TURN = 64          # bounded, so a connect storm cannot starve peers
ACCEPT_PAUSE_SEC = 0.5         # wait this long when out of file descriptors
RESERVED_FDS = 32              # files the server keeps for itself (logs, listeners)
FDS_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
LINGER_SEC = 2.0               # a closing peer gets this long to read its last lines
SHUTDOWN_FLUSH_SEC = 1.0       # output flushed for at most this long on exit

# Joins and leaves this close together are announced in one line that names
# NOTICE_NAMES and counts the rest, and a big room hears at most
# NOTICE_DELIVERIES_PER_SEC of them: a storm of N joins costs O(N) bytes,
# not one notice per join to everyone.
NOTICE_INTERVAL_SEC = 0.25
NOTICE_ONE_BY_ONE = 3          # joins announced a line each (so none hears its own)
NOTICE_NAMES = 10
NOTICE_DELIVERIES_PER_SEC = 20000
WELCOME_NAMES = 20             # names in a newcomer's list of who is online
WHO_PAGE_NAMES = 200           # names per page of /who
ROOMS_PAGE = 50                # rooms per page of /rooms, a line each
MAX_TOPIC_CHARS = 200          # a topic or away reason is cut here

# Sessions that resume (--resume-for).
DEFAULT_RESUME_FOR = 600.0     # a lost connection's name and room wait this long
RESUME_NOTICE = 'To resume after a lost connection: /resume %s'  # 22-character token
LOST_REASONS = ('connection lost', 'no answer to ping')  # not /quit, kick or ban
LOST_NOTE = 'lost the connection'  # "-!- bob lost the connection", or among many leaves
SAID_KEEP_SHARE = 4            # a room keeps what it said for resuming: 4 backlog caps
KEPT_SAID_SHARE = 16           # ... and the rooms no one is in, 16 caps in all
RESUME_SHARE = 2               # a resume sends at most max_backlog / 2 of it, the newest:
# more at once would be cut off as too slow (Server.judge)
SESSION_MAX_RUNS = 1000        # a session's runs (room lines, own lines) kept
SESSION_MAX_ENDED_IGNORES = 100  # --redis: ignores that ended, which its record in Redis
# keeps (for counting a resume elsewhere: Link.missed); more is a flood of /unignore

# The data log (--data).
DATA_LOG_NAME = 'history.log'  # in --data DIR
DEFAULT_DATA_MAX = 64 << 20    # compacted past this size (--data-max)
FSYNC_CHOICES = ('always', 'everysec', 'no')
DATA_RETRY_SEC = 1.0           # after a failed write, the next try waits this long
DATA_MAX_PENDING = 1 << 20     # records kept while the disk refuses them; older go
MAX_MOTD_BYTES = 16 * 1024     # of the MOTD file, read; every newcomer is sent it

# Names that belong to someone (/register, with --data), and messages that
# wait for them.  A password is kept as a salted slow hash, made and checked
# off the loop (Worker): scrypt where hashlib has it, else PBKDF2.
PEOPLE_LOG_NAME = 'people.log'  # in --data DIR: names, waiting messages, sessions
PEOPLE_COMPACT_BYTES = 1 << 20  # rewritten past this (and twice what it was)
MIN_NAME_PASSWORD_CHARS = 6
SCRYPT_COST = (1 << 14, 8, 1)   # n, r, p: 16 MiB of memory and about 50 ms a hash
PBKDF2_ROUNDS = 600000          # of SHA-256, where hashlib has no scrypt (OWASP, 2023)
WORKER_MAX_JOBS = 16            # hashes waiting at once; more are refused (busy)
MAIL_PER_NAME = 50              # messages waiting for one registered name,
MAIL_KEEP_SEC = 7 * 24 * 3600   # for at most a week

# Several servers as one chat (--redis).  A server unheard for LINK_DEAD_SEC
# is taken for dead (its people lost): each beats every LINK_BEAT_SEC, and
# the others look as often, so they know within about 25 s.
DEFAULT_CLUSTER = 'chat'       # --cluster: the prefix of every Redis key and channel
LINK_BEAT_SEC = 5.0
LINK_DEAD_SEC = 20.0
LINK_RETRY_SEC = (0.5, 1, 2, 4, 8)  # waits between tries to link again; the last repeats
LINK_CONNECT_SEC = 5.0         # to reach Redis at start, and for each try after
LINK_MAX_QUEUED = 8 << 20      # unsent to Redis, or unanswered: past it, start again
LINK_GUEST_BLOCK = 1000        # guest numbers taken from Redis at a time
LINK_ROOMS_MAX = 2 * KEPT_ROOMS_MAX  # rooms Redis keeps history for, the last said in,
                               # with room for those people sit in quietly; each linked
                               # server keeps as many no one is in, so it forgets those
                               # Redis has forgotten (Server.keep_empty)
LINK_SESSION_KEEP_SEC = 7 * 24 * 3600  # a session's record in Redis (for resuming
# on another server) lasts this long after its last change, if not ended before
LINK_BUS_KEEP = 100000         # events the bus keeps (about), for servers cut off a while
LINK_READ_COUNT = 1000         # events read from the bus at a time, catching up
LINK_READ_BYTES = 1 << 20      # read from Redis at once, at most (a big reply comes whole),
LINK_READ_CHUNK_BYTES = 256 * 1024  # a recv() at a time
LINK_ANSWER_SEC = 10.0         # Redis silent this long with a command waiting: start again
RESP_MAX_LINE = 64 * 1024      # a reply's header line (Redis's own limit for requests)

# A vanished peer (no FIN, no reset) is found by TCP keepalive probes: the
# first after this long idle, then every interval; after that many
# unanswered it is gone, about two minutes in all.
KEEPALIVE_IDLE_SEC = 60
KEEPALIVE_INTERVAL_SEC = 15
KEEPALIVE_PROBES = 4

# The web side.  Request heads are bounded as TLS handshakes are (slowloris).
HTTP_HEAD_SEC = 10.0           # a request head not complete by then is dropped
WS_PING_SEC = 30.0             # a WebSocket idle this long is pinged, and dropped if
# it has not answered half as long after; looked at every quarter of it, so a
# vanished phone leaves within a minute

# Who gets in.
TLS_HANDSHAKE_SEC = 10.0       # a TLS handshake not done by then is dropped (slowloris)
HTTP_SNIFF_SEC = 0.25          # a new connection's first bytes, if any come this soon,
# tell a browser (HTTP) from a chat client; then the server speaks first
PASSWORD_SEC = 30.0            # the room password must come this soon after connecting
PASSWORD_TRIES = 3             # wrong passwords (room or operator) before the door shuts
GUESSES_PER_HOST = 10          # wrong passwords from one host, across connections,
GUESS_WINDOW_SEC = 600         # within this long, before new connections from it
GUESS_BAN_SEC = 600            # are refused for this long (loopback aside)

# The client.  Piped, it waits QUIT_WAIT_SEC after /quit, plus the time the
# server's default flood budget needs to take the lines it sent.
CONNECT_TIMEOUT_SEC = 10.0
FIRST_LINE_WAIT_SEC = 2.0      # for a server that never speaks first (not chat.py)
QUIT_WAIT_SEC = 5.0
CLIENT_MAX_LINE_BYTES = 64 * 1024  # a longer line from the server is cut
RECONNECT_BACKOFF_SEC = (1, 2, 4, 8, 16, 30)  # waits between tries; the last repeats
RECONNECT_JITTER = 0.2         # +-20 %: a restarted server is not hit all at once
RECONNECT_KEEP_LINES = 100     # typed while cut off, sent once back


# --- Text protocol -----------------------------------------------------------

def _unprintable_table():
    """Map every character that could move the cursor, restyle the terminal,
    or hide or reorder text to nothing; a blank one becomes a space.  Zero-width
    joiners stay: emoji sequences and Persian and Indic spelling need them."""
    table = dict.fromkeys(range(0x00, 0x20))         # C0, including CR and LF
    # A tab, and the other blanks a run of padding could be made of (so that
    # tidy shortens it): no-break, en, em, thin, ideographic spaces and the
    # like, and the blank letters: braille blank, Hangul fillers.
    table.update(dict.fromkeys((0x09, 0xa0, 0x1680, 0x202f, 0x205f, 0x3000, 0x2800, 0x115f,
                                0x1160, 0x3164, 0xffa0), ' '))
    table.update(dict.fromkeys(range(0x2000, 0x200b), ' '))
    table.update(dict.fromkeys(range(0x7f, 0xa0)))   # DEL and C1 (0x9b = CSI)
    table.update(dict.fromkeys((0xad, 0x61c, 0x180e, 0x200b, 0x200e, 0x200f, 0xfeff)))
    # soft hyphen, Arabic letter mark, Mongolian vowel separator, zero-width
    # space, left-to-right and right-to-left marks, byte-order mark
    table.update(dict.fromkeys(range(0x202a, 0x202f)))  # bidi embeddings, overrides
    table.update(dict.fromkeys(range(0x2060, 0x2070)))  # word joiner, invisible
    # operators, bidi isolates, deprecated format characters
    table.update(dict.fromkeys((0x2028, 0x2029)))    # line/paragraph separators
    table.update(dict.fromkeys(range(0xfff9, 0xfffc)))  # interlinear annotations
    table.update(dict.fromkeys(range(0x1bca0, 0x1bca4)))  # shorthand format controls
    table.update(dict.fromkeys(range(0x1d173, 0x1d17b)))  # musical format controls
    table.update(dict.fromkeys(range(0xe0000, 0xe0080)))  # tags
    return table


UNPRINTABLE = _unprintable_table()
UNPRINTABLE_BUT_LF = dict(UNPRINTABLE)  # to clean many lines at once
del UNPRINTABLE_BUT_LF[ord('\n')]
LOG_ESCAPES = {code: '\\x%02x' % code if code < 0x100 else
               '\\u%04x' % code if code < 0x10000 else '\\U%08x' % code
               for code in UNPRINTABLE}
# Letters and marks that show nothing on their own: a line of only these
# (and spaces) is as empty as a blank one.  Hangul fillers, braille blank,
# joiners, variation selectors and other default-ignorable marks.
INVISIBLE = ('\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u200c\u200d\u2800\u3164'
             '\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef')
# A line of only these and spaces, between newlines: a pattern that starts with
# a literal lets re jump from newline to newline (six times faster on Python 3.11
# than trying "^" at every character, as re.MULTILINE does).
BLANK_LINE = re.compile(r'\n(?:[^\S\n]|[%s])*\n' % INVISIBLE)
SPACE_RUN = re.compile(' {%d,}' % (MAX_SPACE_RUN + 1))
_mark_runs = []                # compiled on first use: building it takes 0.1 s


def mark_runs():
    """A regular expression for a run of more than MAX_MARKS combining marks."""
    if not _mark_runs:
        marks, start = [], None
        for code in range(sys.maxunicode + 2):  # one past the end closes the last range
            is_mark = code <= sys.maxunicode and unicodedata.category(chr(code))[0] == 'M'
            if is_mark and start is None:
                start = code
            elif not is_mark and start is not None:
                marks.append('%s-%s' % (chr(start), chr(code - 1)))
                start = None
        mark_class = '[%s]' % ''.join(marks)
        _mark_runs.append(re.compile('(%s{%d})%s+' % (mark_class, MAX_MARKS, mark_class)))
    return _mark_runs[0]


def clean(text, table=UNPRINTABLE):
    """Return text without control, escape or format characters that could
    drive a terminal or hide or reorder text, and without the marks past
    MAX_MARKS on any one letter (a letter under 2,000 accents covers the
    lines around it)."""
    text = text.translate(table)
    if not is_ascii(text):
        text = mark_runs().sub(r'\1', text)
    return text


def tidy(text, table=UNPRINTABLE):
    """What the server makes of a text a peer says to others: clean, and no
    run of spaces longer than MAX_SPACE_RUN, so that padding cannot push
    text to the start of the next row of an 80-column terminal unseen
    (where it would look like a line of its own)."""
    text = clean(text, table)
    if ' ' * (MAX_SPACE_RUN + 1) in text:
        text = SPACE_RUN.sub(' ' * MAX_SPACE_RUN, text)
    return text


def has_blank_line(text):
    """True if a line of text (one, or several joined by newlines) would
    show nothing: spaces and invisible letters only."""
    return BLANK_LINE.search('\n%s\n' % text) is not None


def decode(raw):
    """Turn bytes from the network into clean text; invalid UTF-8 becomes U+FFFD."""
    return clean(raw.decode('utf-8', 'replace'))


def public_line(name, text):
    return ('<%s> %s\n' % (name, text)).encode()


def action_line(name, text):
    return ('* %s %s\n' % (name, text)).encode()


PRIVATE_PREFIX = '[PM from '  # what a private message's line starts with


def private_line(sender, text):
    return ('%s%s] %s\n' % (PRIVATE_PREFIX, sender, text)).encode()


def sent_line(recipient, text):
    return ('[PM to %s] %s\n' % (recipient, text)).encode()


def notice_line(text):
    return ('-!- %s\n' % text).encode()


def error_line(text):
    return ('!!! %s\n' % text).encode()


# Fixed notices stay within 72 columns: with the client's "HH:MM " a line
# still fits an 80-column terminal.
WELCOME_TEXT = 'Welcome, %s! /help lists commands; /nick NAME picks a name.'
YOU_ARE_IN = 'You are in %s'  # on joining, and after every /join and /part
LOBBY = 'lobby'                # where everyone starts
ENTER_TO_JOIN = 'chat.py here: press Enter to join the chat'
PASSWORD_PROMPT = 'This room needs a password: send /pass PASSWORD within %d s' % PASSWORD_SEC
PASSWORD_ACCEPTED = 'Password accepted'
NOT_TLS = 'this server speaks TLS: join with python3 chat.py client HOST --tls'
FLOOD_TEXT = 'flood control: your lines wait, %g per second'
LINE_LIMIT_TEXT = 'lines here hold at most %d bytes'  # said at join if not MAX_LINE_BYTES
LINK_DOWN = 'the link to the other servers is down; only people on this server hear you'
LINKED_AGAIN = 'linked again'
GOODBYE = 'Goodbye'            # the answer to /quit: a client that sees it left cleanly
NUMBER = re.compile(r'^[0-9]{1,6}$')  # str.isdigit() also takes '²', which int() refuses

NAME_PUNCTUATION = '_-.'
SERVER_NAME = 'server'         # who the server's console speaks as; no one else may
GUEST_PREFIX = 'guest-'
# Default-ignorable code points (Unicode's DerivedCoreProperties): they show
# nothing, so "alice" with one of them would sit beside "alice".  NFKC and
# case folding keep most of them, so names are refused that hold any.
IGNORABLE = re.compile('[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f'
                       '\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff'
                       '\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a'
                       '\U000e0000-\U000e0fff]')
# Scripts that may share a name, as in Unicode's "highly restrictive" profile
# (UTS #39): Japanese, Chinese and Korean writing mix Han with their own
# scripts and Latin.  Any other name keeps to one script (digits, "_-." and
# general combining marks belong to every script).
SCRIPT_MIXES = ({'LATIN', 'HAN', 'HIRAGANA', 'KATAKANA'}, {'LATIN', 'HAN', 'BOPOMOFO'},
                {'LATIN', 'HAN', 'HANGUL'})
# The first word of a character's Unicode name is its script, but for these.
SCRIPT_ALIASES = {'CJK': 'HAN', 'IDEOGRAPHIC': 'HAN', 'KATAKANA-HIRAGANA': None,
                  'ARABIC-INDIC': 'ARABIC', 'EXTENDED': 'ARABIC',
                  'DIGIT': None, 'COMBINING': None, 'LOW': None, 'HYPHEN-MINUS': None,
                  'FULL': None}


def script(ch):
    """The script ch is written in, as its Unicode name says; None for one
    that goes with any (ASCII digits, the name punctuation, general marks)."""
    word = unicodedata.name(ch, '?').split(' ')[0]
    return SCRIPT_ALIASES.get(word, word)


def latin_but_rare(ch):
    """True for Latin letters that names do not need and that pass for
    others: clicks like U+01C0 (an "l"), small capitals, IPA.  Names keep to
    the Latin letters of Western, Central European and Vietnamese writing."""
    code = ord(ch)
    common = code < 0x250 or 0x1e00 <= code < 0x1f00
    return not common or unicodedata.category(ch) == 'Lo'


def name_key(name):
    """The form names are compared in: NFKC, case-folded, so that 'Alice',
    'ALICE' and the fullwidth 'Ａｌｉｃｅ' are all the same name.  NFKC again
    after folding, as Unicode's NFKC_Casefold does: folding can undo it."""
    return unicodedata.normalize('NFKC', unicodedata.normalize('NFKC', name).casefold())


def name_problem(name):
    """Why name cannot be used, or None if it can (uniqueness aside)."""
    if not name:
        return 'a name needs at least one character'
    if len(name) > MAX_NAME_CHARS:
        return 'a name has at most %d characters' % MAX_NAME_CHARS
    if IGNORABLE.search(name):
        return 'a name may not hold invisible characters'
    for i, ch in enumerate(name):
        category = unicodedata.category(ch)
        # Marks (Mn, Mc) carry vowels in many scripts, but only after a letter.
        allowed = category[0] == 'L' or category == 'Nd' or ch in NAME_PUNCTUATION
        if not allowed and not (i and category[0] == 'M'):
            return 'a name may hold only letters, digits and "_", "-", "."'
    scripts = set()
    for ch in unicodedata.normalize('NFKC', name):
        scripts.add(script(ch))
        if script(ch) == 'LATIN' and latin_but_rare(ch):
            return 'a name may not hold the rare Latin letter %s' % ch
    scripts.discard(None)
    if len(scripts) > 1 and not any(scripts <= mix for mix in SCRIPT_MIXES):
        return 'a name may not mix scripts (%s)' % ' and '.join(
            sorted(word.title() for word in scripts))
    if parse_network(name) is not None:
        return 'a name may not look like an address (for /ban)'
    return None


def name_list(names, limit, total=None):
    """'a, b, c', or 'a, b and 5 others' when there are more than limit
    (of total, if names holds only the first few)."""
    total = len(names) if total is None else total
    if total <= limit:
        return ', '.join(names)
    return '%s and %d others' % (', '.join(names[:limit]), total - limit)


def plural(count, noun):
    return '%d %s%s' % (count, noun, '' if count == 1 else 's')


def same_secret(given, secret):
    """Compare a password in constant time (digests, so even its length
    stays secret)."""
    given, secret = (hashlib.sha256(text.encode('utf-8', 'replace')).digest()
                     for text in (given, secret))
    return hmac.compare_digest(given, secret)


def parse_network(text):
    """An IP address or CIDR network, or None.  IPv4-mapped IPv6 networks
    (::ffff:10.0.0.0/104) become IPv4, as the peers they must match do."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    mapped = getattr(network.network_address, 'ipv4_mapped', None)
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.ip_network('%s/%d' % (mapped, network.prefixlen - 96))
    return network


def host_of(ip):
    """The network that is one host, for caps, guesses and bans: an IPv4
    address, or the /64 an IPv6 host is given (it can pick any address in
    it, so counting single addresses would count nothing)."""
    return ipaddress.ip_network((ip, 64 if ip.version == 6 else 32), strict=False)


def banned_network(text):
    """What /ban and /unban take text to mean, if an address: the network
    it names, a single IPv6 address as its /64 (see host_of); else None."""
    network = parse_network(text)
    if network is not None and '/' not in text:
        network = host_of(network.network_address)
    return network


def address_ip(address):
    """The IP address of a socket address; IPv4 as itself on a dual-stack socket."""
    ip = ipaddress.ip_address(address[0].split('%')[0])
    return getattr(ip, 'ipv4_mapped', None) or ip


def printable_address(address):
    """'host:port' for a socket address, '[v6]:port' for IPv6."""
    host, port = address[0], address[1]
    if host.startswith('::ffff:') and '.' in host:  # IPv4 on a dual-stack socket
        host = host[len('::ffff:'):]
    return ('[%s]:%d' if ':' in host else '%s:%d') % (host, port)


# --- Wire formats: HTTP and WebSocket ----------------------------------------

# How an HTTP request starts: a method, a space, and a path ("/..."), "*" or
# a scheme or host ("http:", "example.org:443").  A browser can be made to
# send one to any port (a web page's fetch()), with a request line of any
# length, so a connection is judged on its first bytes, not its first line.
HTTP_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'OPTIONS', 'PATCH', 'CONNECT',
                'TRACE')
HTTP_START = re.compile(br'^(?:%s) (?:[/*]|[A-Za-z][-A-Za-z0-9+.]*:)'
                        % '|'.join(HTTP_METHODS).encode())
SCHEME_SO_FAR = re.compile(br'^[A-Za-z][-A-Za-z0-9+.]{0,15}$')


def http_verdict(first):
    """Whether the first bytes of a connection are an HTTP request: True,
    False, or None when too few have come to tell."""
    if HTTP_START.match(first):
        return True
    for method in HTTP_METHODS:
        head = method.encode() + b' '
        if head.startswith(first) or (first.startswith(head)
                                      and SCHEME_SO_FAR.match(first[len(head):])):
            return None
    return False



HTTP_MAX_HEAD_BYTES = 8192     # request line and headers; nginx's default buffer is 8 KiB
HEAD_END = re.compile(br'\r?\n\r?\n')  # bare LF is tolerated, as RFC 9112 allows
LINE_END = re.compile(br'\r?\n')
TOKEN = br"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE = re.compile(b'(' + TOKEN + br') ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\Z')
# A field value may hold tabs, printable ASCII and (obsolete) Latin-1, never other controls.
HEADER_LINE = re.compile(b'(' + TOKEN + br'):([\t\x20-\x7e\x80-\xff]*)\Z')
# A DNS name or IPv4 address, or a bracketed IPv6 one, and a port.  Stricter
# than RFC 3986 on purpose: page_csp() puts this value in a header.
HOST_VALUE = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?\Z')


class HttpRequest:
    """A parsed request head.  headers maps lowercase names to stripped
    values (repeats joined by ', '); head_length counts the bytes the head
    took, blank line included, so buf[head_length:] is what followed it."""

    def __init__(self, method, target, version, headers, head_length):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition('?')
        self.version = version
        self.headers = headers
        self.head_length = head_length


class HttpError:
    """Why a request is refused: the status, its reason phrase, and any
    (name, value) headers the answer must carry."""

    def __init__(self, status, reason, headers=()):
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)

    def response(self, head_only=False):
        """The complete plain-text HTTP answer for this error."""
        return http_response(self.status, self.reason, ('%s\n' % self.reason).encode(),
                             headers=self.headers, head_only=head_only)


def read_request_head(buf):
    """Parse the request head at the start of buf: None while it is
    incomplete, else an HttpRequest or an HttpError (431 or 400)."""
    end = HEAD_END.search(buf, 0, HTTP_MAX_HEAD_BYTES)
    if end is None:
        if len(buf) > HTTP_MAX_HEAD_BYTES:
            return HttpError(431, 'Request Header Fields Too Large')
        return None
    lines = LINE_END.split(bytes(buf[:end.start()]))
    request_line = REQUEST_LINE.match(lines[0])
    if request_line is None:
        return HttpError(400, 'Bad Request: malformed request line')
    method, target, version = (part.decode('ascii') for part in request_line.groups())
    if version not in ('HTTP/1.0', 'HTTP/1.1'):
        return HttpError(400, 'Bad Request: only HTTP/1.0 and HTTP/1.1 are spoken here')
    headers = {}
    for line in lines[1:]:
        header = HEADER_LINE.match(line)
        if header is None:  # no colon, a control byte, or an obs-fold continuation
            return HttpError(400, 'Bad Request: malformed header line')
        name = header.group(1).decode('ascii').lower()
        value = header.group(2).strip(b' \t').decode('latin-1')
        headers[name] = headers[name] + ', ' + value if name in headers else value
    # Two Host headers fail here too: joined, they hold ', '.
    if 'host' in headers and not HOST_VALUE.match(headers['host']):
        return HttpError(400, 'Bad Request: malformed Host header')
    if version == 'HTTP/1.1' and 'host' not in headers:
        return HttpError(400, 'Bad Request: HTTP/1.1 needs a Host header')
    return HttpRequest(method, target, version, headers, end.end())


# HTTP responses and the page's content security policy.

DEFAULT_CSP = "default-src 'none'"
# Sent with every response: no sniffing a text answer into HTML, no leaking
# the page address, no framing (clickjacking), no keeping chat in caches.
SECURITY_HEADER_LINES = ['X-Content-Type-Options: nosniff', 'Referrer-Policy: no-referrer',
                         'X-Frame-Options: DENY', 'Cache-Control: no-store']


def http_response(status, reason, body=b'', content_type='text/plain; charset=utf-8',
                  headers=(), csp=DEFAULT_CSP, head_only=False):
    """A complete HTTP/1.1 response that closes the connection; headers are
    extra (name, value) pairs.  With head_only the body is left out but
    still counted in Content-Length, as a HEAD answer must."""
    lines = ['HTTP/1.1 %d %s' % (status, reason), 'Content-Type: %s' % content_type,
             'Content-Length: %d' % len(body), 'Connection: close',
             'Content-Security-Policy: %s' % csp] + SECURITY_HEADER_LINES
    lines.extend('%s: %s' % pair for pair in headers)
    for line in lines:
        if '\r' in line or '\n' in line:  # a value from a request must not add headers
            raise ValueError('line break in response header %r' % line)
    head = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
    return head if head_only else head + body


def csp_hash(text):
    """The CSP source "'sha256-...'" that allows one inline script or style."""
    digest = hashlib.sha256(text.encode('utf-8')).digest()
    return "'sha256-%s'" % base64.b64encode(digest).decode('ascii')


def page_csp(host, scheme='http', script_hash=None, style_hash=None):
    """The CSP for the chat page: only its own inline script and style (by
    csp_hash(), or none), and WebSockets back to host, the request's checked
    Host header.  'self' covers ws: in CSP level 3 browsers; the explicit
    ws(s)://host is for older ones.  The socket's scheme follows the page's:
    an https page may not open ws: (mixed content), so it is not offered."""
    if not HOST_VALUE.match(host):
        raise ValueError('not a host: %r' % host)
    socket_scheme = 'wss' if scheme == 'https' else 'ws'
    return ("default-src 'none'; script-src %s; style-src %s; connect-src 'self' %s://%s; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (script_hash or "'none'", style_hash or "'none'", socket_scheme, host))


# The WebSocket handshake (RFC 6455 section 4).

WEBSOCKET_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
DEFAULT_PORTS = {'http': 80, 'https': 443, 'ws': 80, 'wss': 443}
ORIGIN = re.compile(r'([a-z][a-z0-9+.-]*)://([^/?#@]+?)(?::([0-9]{1,5}))?/?\Z')


def websocket_accept(key):
    """The Sec-WebSocket-Accept value that answers a Sec-WebSocket-Key."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode('ascii')).digest()
    return base64.b64encode(digest).decode('ascii')


def header_tokens(request, name):
    """The lowercase comma-separated tokens of a header, as a set."""
    return set(token.strip().lower() for token in request.headers.get(name, '').split(','))


def websocket_problem(request):
    """None if request is a valid WebSocket upgrade, else the HttpError to answer."""
    if request.method != 'GET' or request.version != 'HTTP/1.1':
        return HttpError(400, 'Bad Request: a WebSocket upgrade is a GET over HTTP/1.1')
    if 'websocket' not in header_tokens(request, 'upgrade'):
        return HttpError(400, 'Bad Request: Upgrade: websocket is missing')
    if 'upgrade' not in header_tokens(request, 'connection'):
        return HttpError(400, 'Bad Request: Connection: Upgrade is missing')
    if request.headers.get('sec-websocket-version') != '13':  # missing or another (RFC 6455 4.4)
        return HttpError(426, 'Upgrade Required', [('Sec-WebSocket-Version', '13')])
    try:
        key = base64.b64decode(request.headers.get('sec-websocket-key', ''), validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII key
        key = b''
    if len(key) != 16:
        return HttpError(400, 'Bad Request: Sec-WebSocket-Key is not 16 bytes in base64')
    return None


def normal_origin(origin):
    """An origin in the form origins are compared in: lowercase, without a
    default port.  Anything that does not parse (such as 'null') stays as is."""
    origin = origin.strip().lower()
    parsed = ORIGIN.match(origin)
    if parsed is None:
        return origin
    scheme, host, port = parsed.groups()
    if port is None or int(port) == DEFAULT_PORTS.get(scheme):
        return '%s://%s' % (scheme, host)
    return '%s://%s:%d' % (scheme, host, int(port))


def origin_allowed(request, scheme, allowed_origins):
    """Whether a WebSocket request may go on: it comes from no browser (no
    Origin), from a page of this server (scheme plus the Host header), or
    from one of allowed_origins.  This is what stops another site's page
    from opening a socket in its visitor's name (cross-site WebSocket hijacking)."""
    origin = request.headers.get('origin')
    if origin is None:
        return True
    origin = normal_origin(origin)
    host = request.headers.get('host')
    if host is not None and origin == normal_origin('%s://%s' % (scheme, host)):
        return True
    return origin in set(normal_origin(allowed) for allowed in allowed_origins)


def websocket_response(request):
    """The 101 Switching Protocols answer to a valid upgrade request."""
    return ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n'
            'Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n'
            % websocket_accept(request.headers['sec-websocket-key'])).encode('ascii')


# WebSocket framing (RFC 6455 section 5).

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
OPCODES = (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON_BYTES = MAX_CONTROL_PAYLOAD - 2
# Close codes a peer may send: 1004-1006 and 1015 are reserved for local use,
# 1016-2999 are unassigned, 3000-4999 belong to libraries and applications.
CLOSE_CODES_ON_WIRE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
UTF8_DECODER = codecs.getincrementaldecoder('utf-8')
# The heads of short text frames (FIN, OP_TEXT, a length below 126), prebuilt
# for text_frames(): most chat lines are short.
SHORT_TEXT_HEADS = tuple(bytes((0x80 | OP_TEXT, n)) for n in range(126))


def mask_payload(data, mask):
    """XOR data with a 4-byte mask; masking twice unmasks."""
    # One big-integer XOR: 2.5-5 us for 1 KB where a loop over the bytes takes
    # 70-170 us (3.6-3.13).  bytes.translate() on every 4th byte wins only
    # above 4 KB, past any chat line, and needs a 64 KB table.
    size = len(data)
    pad = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, 'big') ^ int.from_bytes(pad, 'big')).to_bytes(size, 'big')


class ProtocolFailure(Exception):
    """A frame broke RFC 6455: args are the close code and a reason."""


class WebSocketReader:
    """Turn the bytes of a WebSocket connection into events, as tuples:

        ('text', str)            a complete text message
        ('lines', bytes)         complete short text messages, each ended by
                                 a newline (the common case, read in bulk)
        ('ping', bytes)          answer with a pong carrying the same bytes
        ('pong', bytes)
        ('close', code, reason)  answer close_frame(code), echoing the code;
                                 None if the peer sent none (then no code)
        ('fail', code, reason)   the peer broke the protocol: send
                                 close_frame(code, reason) and hang up

    After a close or fail event the reader ignores all further input.  A
    message may span fragments, with control frames between them; its size
    is checked against max_message_bytes from each frame's header, before
    the payload is buffered, so a peer can make it hold at most one
    message (max_message_bytes plus a 14-byte header)."""

    def __init__(self, max_message_bytes, client_side=False):
        self.max_message_bytes = max_message_bytes
        self.client_side = client_side  # True: read a server's unmasked frames
        self.inbuf = bytearray()
        self.decoder = None             # a UTF-8 decoder while a message is open
        self.message_parts = []         # its text so far
        self.message_bytes = 0          # its payload bytes so far
        self.finished = False

    def feed(self, data):
        """Take more bytes from the peer; return the list of events they complete."""
        if self.finished:
            return []
        self.inbuf += data
        events = []
        try:
            while not self.finished:
                lines = self.short_messages()
                if lines:
                    events.append(('lines', lines))
                frame = self.next_frame()
                if frame is None:
                    break
                event = self.frame_event(*frame)
                if event is not None:
                    events.append(event)
        except ProtocolFailure as failure:
            self.finished = True
            events.append(('fail',) + failure.args)
        if self.finished:
            del self.inbuf[:]
        return events

    def short_messages(self):
        """The common case in bulk: a run of whole, masked, short (one-byte
        length) text frames at the start of inbuf, unmasked with one big XOR
        and checked as UTF-8 in one decode, as newline-ended lines.  The
        newline between two payloads meets a zero in the mask stream, so it
        survives the XOR.  b'' if there is no such run, or if it is not valid
        UTF-8 (next_frame then reads it frame by frame, to say which)."""
        buf = self.inbuf
        if self.decoder is not None or self.client_side:
            return b''
        end, size, payloads, masks = 0, len(buf), [], []
        while end + 6 <= size and buf[end] == 0x81 and 0x80 <= buf[end + 1] < 0x80 + 126:
            start = end + 6
            end = start + buf[end + 1] - 0x80
            if end > size:
                end = start - 6
                break
            payloads.append(buf[start:end])
            masks.append((buf[start - 4:start] * 32)[:end - start])  # 32 x 4 > 125
        if len(payloads) < 2:  # nothing to gain in bulk: frame by frame
            return b''
        joined, stream = b'\n'.join(payloads) + b'\n', b'\0'.join(masks) + b'\0'
        lines = (int.from_bytes(joined, 'big') ^ int.from_bytes(stream, 'big')).to_bytes(
            len(joined), 'big')
        try:
            lines.decode('utf-8')
        except UnicodeDecodeError:
            return b''
        del buf[:end]
        return lines

    def next_frame(self):
        """Cut the next complete frame from inbuf as (opcode, fin, payload),
        or None while it is incomplete; raise ProtocolFailure as soon as the
        header shows a rule broken."""
        buf = self.inbuf
        if len(buf) < 2:
            return None
        fin, opcode, masked, length = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
        if buf[0] & 0x70:
            raise ProtocolFailure(1002, 'reserved bits set without an extension')
        if opcode not in OPCODES:
            raise ProtocolFailure(1002, 'unknown opcode %d' % opcode)
        if bool(masked) == self.client_side:
            raise ProtocolFailure(1002, 'masked frame' if masked else 'unmasked client frame')
        size_bytes = {126: 2, 127: 8}.get(length, 0)
        header_bytes = 2 + size_bytes + (4 if masked else 0)
        if len(buf) < header_bytes:
            return None
        if size_bytes:
            length = struct.unpack_from('!H' if size_bytes == 2 else '!Q', buf, 2)[0]
        if length >> 63:
            raise ProtocolFailure(1002, 'frame length has its top bit set')
        if opcode >= OP_CLOSE and (not fin or length > MAX_CONTROL_PAYLOAD):
            raise ProtocolFailure(1002, 'control frame fragmented or over 125 bytes')
        if opcode < OP_CLOSE:
            self.check_data_frame(opcode, length)
        end = header_bytes + length
        if len(buf) < end:
            return None
        payload = buf[header_bytes:end]
        if masked:
            payload = mask_payload(payload, buf[header_bytes - 4:header_bytes])
        del buf[:end]  # cheap: a bytearray drops its head without moving the rest
        return opcode, fin, payload

    def check_data_frame(self, opcode, length):
        """Refuse a data frame, from its header alone, that does not fit the
        open message or would make it too long."""
        if opcode == OP_CONT and self.decoder is None:
            raise ProtocolFailure(1002, 'continuation frame without a message')
        if opcode != OP_CONT and self.decoder is not None:
            raise ProtocolFailure(1002, 'new message before the last one ended')
        if opcode == OP_BINARY:
            raise ProtocolFailure(1003, 'only text messages are accepted')
        if self.message_bytes + length > self.max_message_bytes:
            raise ProtocolFailure(1009, 'message longer than %d bytes' % self.max_message_bytes)

    def frame_event(self, opcode, fin, payload):
        """The event a complete, well-formed frame makes, or None for a
        fragment that leaves its message open."""
        if opcode == OP_PING:
            return ('ping', bytes(payload))
        if opcode == OP_PONG:
            return ('pong', bytes(payload))
        if opcode == OP_CLOSE:
            self.finished = True
            return ('close',) + parse_close(payload)
        if self.decoder is None:
            self.decoder = UTF8_DECODER('strict')
        try:  # incremental: a character split between fragments is fine
            text = self.decoder.decode(payload, bool(fin))
        except UnicodeDecodeError:
            raise ProtocolFailure(1007, 'text message is not valid UTF-8')
        if text:  # empty fragments add nothing, so they cannot grow the list
            self.message_parts.append(text)
        self.message_bytes += len(payload)
        if not fin:
            return None
        message = ''.join(self.message_parts)
        self.decoder, self.message_parts, self.message_bytes = None, [], 0
        return ('text', message)


def parse_close(payload):
    """The (code, reason) of a close frame's payload; code None if empty."""
    if not payload:
        return None, ''
    if len(payload) == 1:
        raise ProtocolFailure(1002, 'close frame with a 1-byte payload')
    code = struct.unpack_from('!H', payload)[0]
    if code not in CLOSE_CODES_ON_WIRE:
        raise ProtocolFailure(1002, 'close code %d may not be sent' % code)
    try:
        return code, bytes(payload[2:]).decode('utf-8')
    except UnicodeDecodeError:
        raise ProtocolFailure(1007, 'close reason is not valid UTF-8')


def frame_head(opcode, size, fin=True, masked=False):
    """The 2, 4 or 10 bytes that start a frame, before any mask."""
    first, mask_bit = (0x80 if fin else 0) | opcode, 0x80 if masked else 0
    if size < 126:
        return bytes((first, mask_bit | size))
    if size < 65536:
        return struct.pack('!BBH', first, mask_bit | 126, size)
    return struct.pack('!BBQ', first, mask_bit | 127, size)


def encode_frame(opcode, payload, mask=None, fin=True):
    """One frame: unmasked as a server sends it, or masked with a 4-byte
    mask as a client must.  fin=False starts or continues a fragmented message."""
    head = frame_head(opcode, len(payload), fin, mask is not None)
    if mask is None:
        return head + payload
    return head + mask + mask_payload(payload, mask)


def close_frame(code=None, reason=''):
    """A server's close frame; the reason (only sent with a code) is cut to
    fit 125 bytes without splitting a character."""
    if code is None:
        return encode_frame(OP_CLOSE, b'')
    reason = reason.encode('utf-8')[:MAX_CLOSE_REASON_BYTES].decode('utf-8', 'ignore')
    return encode_frame(OP_CLOSE, struct.pack('!H', code) + reason.encode('utf-8'))


def text_frames(blob):
    """One unmasked text frame per line of blob (complete lines of valid
    UTF-8, each ending in b'\\n', which is dropped).  Built once per room
    and loop turn for every WebSocket in it, so it is tuned for many short
    lines: prebuilt heads, and the lines joined without copying them twice."""
    lines = blob.split(b'\n')
    lines.pop()  # the empty piece after the last newline
    parts = [None] * (2 * len(lines))
    parts[::2] = [SHORT_TEXT_HEADS[size] if size < 126 else frame_head(OP_TEXT, size)
                  for size in map(len, lines)]
    parts[1::2] = lines
    return b''.join(parts)


def client_text_frame(text, mask=None):
    """A masked text frame as a client sends it (tests, the load generator);
    a random mask unless one is given."""
    return encode_frame(OP_TEXT, text.encode('utf-8'), mask or os.urandom(4))


# --- Wire formats: telnet ----------------------------------------------------

# Telnet commands (RFC 854).  A byte 0xFF never occurs in UTF-8, so in what
# a peer sends it can only be telnet's IAC.
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
TIMING_MARK = 6                # RFC 860: telnet waits for it after Ctrl-C
TELNET_SUBNEGOTIATION_BYTES = 512  # a longer one is dropped unread


def strip_telnet(data):
    """Split bytes from a telnet client into (text, replies, rest): the text
    without any telnet command, the replies its negotiation needs, and the
    start of a command that the next read completes.  Every option is
    refused (we are a plain line service), except that DO TIMING-MARK is
    answered WILL TIMING-MARK: after Ctrl-C telnet sends IAC IP IAC DO
    TIMING-MARK and discards all output until that answer comes."""
    text, replies, i = bytearray(), bytearray(), 0
    while True:
        j = data.find(b'\xff', i)
        if j < 0:
            text += data[i:]
            return bytes(text), bytes(replies), b''
        text += data[i:j]
        if j + 1 == len(data):
            return bytes(text), bytes(replies), data[j:]
        command = data[j + 1]
        if command in (DO, DONT, WILL, WONT):
            if j + 2 == len(data):
                return bytes(text), bytes(replies), data[j:]
            option = data[j + 2]
            if command == DO:
                replies += bytes((IAC, WILL if option == TIMING_MARK else WONT, option))
            elif command == WILL:
                replies += bytes((IAC, DONT, option))
            i = j + 3  # DONT and WONT are acknowledged by doing nothing
        elif command == SB:
            end = data.find(b'\xff\xf0', j)
            if end < 0:
                if len(data) - j > TELNET_SUBNEGOTIATION_BYTES:
                    return bytes(text), bytes(replies), b''
                return bytes(text), bytes(replies), data[j:]
            i = end + 2
        else:  # IAC IAC, IP, AO, AYT, BRK, DM, NOP, GA, EL, EC: nothing to say
            i = j + 2


# --- Wire formats: Redis (RESP2) ---------------------------------------------

class RespError(Exception):
    """An error reply from Redis ("-WRONGPASS ..."): args[0] is its text."""


class RespFailure(Exception):
    """What came from Redis is not RESP2: the connection cannot go on."""


def resp_command(*args):
    """One Redis command (str, bytes or int arguments) as RESP: an array of
    bulk strings, which needs no escaping whatever the bytes are."""
    parts = [b'*%d\r\n' % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode('utf-8')
        elif isinstance(arg, int):
            arg = b'%d' % arg
        parts += (b'$%d\r\n' % len(arg), arg, b'\r\n')
    return b''.join(parts)


INCOMPLETE = object()  # RespReader.parse: the reply is not all here yet


class RespReader:
    """Redis's replies, sans I/O: feed() bytes as they come; replies()
    takes every complete one, as str (simple string), int, bytes or None
    (bulk string), list (array) or RespError.  Only RESP2: the server
    never asks Redis for RESP3 (HELLO 3)."""

    def __init__(self):
        self.buf = bytearray()
        self.need = 0    # bytes the unfinished reply needs at least: not parsed again before

    def feed(self, data):
        self.buf += data

    def replies(self):
        if len(self.buf) < self.need:
            return []  # a big reply coming in pieces is parsed once, not once a piece
        found, pos = [], 0
        while True:
            reply, end = self.parse(pos, 0)
            if reply is INCOMPLETE:
                break
            found.append(reply)
            pos = end
        del self.buf[:pos]
        self.need -= pos
        return found

    def parse(self, pos, depth):
        """The reply at pos and where it ends, or INCOMPLETE."""
        buf = self.buf
        end = buf.find(b'\r\n', pos, pos + RESP_MAX_LINE)
        if end < 0:
            if len(buf) - pos >= RESP_MAX_LINE:
                raise RespFailure('a reply line longer than %d bytes' % RESP_MAX_LINE)
            self.need = len(buf) + 1
            return INCOMPLETE, pos
        kind, line, after = buf[pos:pos + 1], bytes(buf[pos + 1:end]), end + 2
        if kind == b'+':
            return line.decode('utf-8', 'replace'), after
        if kind == b'-':
            return RespError(line.decode('utf-8', 'replace')), after
        try:
            number = int(line)  # (int() would take b' 1' or b'1_0': Redis sends neither)
        except ValueError:
            raise RespFailure('not RESP: %r' % bytes(buf[pos:pos + 40]))
        if kind == b':':
            return number, after
        if kind == b'$':
            if number < 0:
                return None, after
            if len(buf) < after + number + 2:
                self.need = after + number + 2
                return INCOMPLETE, pos
            if buf[after + number:after + number + 2] != b'\r\n':
                raise RespFailure('a bulk string not ended by CRLF')
            return bytes(buf[after:after + number]), after + number + 2
        if kind == b'*' and depth < 8:  # Redis's replies nest a few levels at most
            items = []
            for _ in range(max(0, number)):
                item, after = self.parse(after, depth + 1)
                if item is INCOMPLETE:
                    return INCOMPLETE, pos
                items.append(item)
            return (items if number >= 0 else None), after
        raise RespFailure('not RESP2: %r' % bytes(buf[pos:pos + 40]))


RedisURL = collections.namedtuple('RedisURL', 'tls host port username password db')


def parse_redis_url(url):
    """redis://[USER:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS) as a
    RedisURL; a UserError says what is wrong with it.  USER and PASSWORD
    are percent-encoded, so that a password may hold "@", ":" or "/"."""
    match = re.match(r'(rediss?)://(?:([^:@/]*)(?::([^@/]*))?@)?(\[[^\]/]+\]|[^:/@\[\]]+)'
                     r'(?::([0-9]{1,5}))?(?:/([0-9]{0,9}))?\Z', url or '')
    if not match:
        raise UserError('bad Redis URL: give redis://[USER:PASSWORD@]HOST[:PORT][/DB] '
                        '(or rediss:// for TLS)')
    scheme, user, password, host, port, db = match.groups()
    port = int(port or 6379)
    if not 0 < port < 65536:
        raise UserError('bad Redis URL: the port must be 1-65535')
    return RedisURL(scheme == 'rediss', host.strip('[]'),
                    port, urllib.parse.unquote(user) if user else None,
                    urllib.parse.unquote(password) if password is not None else None,
                    int(db or 0))



# --- Server ------------------------------------------------------------------

TOO_LONG = object()  # what Peer.next_line returns for an overlong line


class Peer:
    """One connection to the server: its socket, buffers, name and flood budget."""

    __slots__ = ('sock', 'address', 'ip', 'inbuf', 'outbuf', 'name', 'key', 'room', 'skipping',
                 'tokens', 'tokens_at', 'paused', 'held', 'warned', 'eof', 'close_reason',
                 'lingering', 'events', 'turn', 'batch_pos', 'behind_since', 'handshaking',
                 'wants_write', 'sniffing', 'heard', 'telnet', 'authorized', 'operator',
                 'strikes', 'lines', 'since', 'active_at', 'away', 'muted', 'ignoring',
                 'ignored_by', 'replies_to', 'http', 'websocket', 'told_last', 'heard_at',
                 'pinged', 'session', 'lost_at', 'home', 'claimed')

    def __init__(self, sock, address, burst, ip=None):
        self.sock = sock
        self.address = address      # printable, for logs
        self.ip = ip                # for address rules, caps and bans
        self.inbuf = bytearray()    # received bytes not yet handled as lines
        self.outbuf = bytearray()   # bytes queued for it that send() has not taken
        self.name = None            # set once it is let in
        self.key = None             # name_key(name)
        self.room = None            # the Room it is in, once let in
        self.skipping = False       # discarding the rest of an overlong line
        self.tokens = burst         # lines it may send now (flood budget)
        self.tokens_at = time.monotonic()
        self.paused = False         # over budget: not read until it refills
        self.held = False           # waiting in Server.held for its room's output to drain
        self.warned = False         # told that flood control delays its lines
        self.eof = False            # it will send nothing more
        self.close_reason = None    # set when it is on its way out
        self.lingering = False      # leaving: input ignored, output flushed, then closed
        self.events = 0             # what the selector watches it for now
        self.turn = -1              # last loop turn it was given its room's lines in,
        self.batch_pos = 0          # and how many of that turn's it has had
        self.behind_since = None    # when its backlog last passed max_backlog / BEHIND_SHARE
        self.handshaking = False    # in its TLS handshake,
        self.wants_write = False    # which waits to write
        self.sniffing = False       # waiting for its first bytes before it is spoken to
        self.heard = False          # its first bytes were judged (not HTTP)
        self.telnet = b''           # the start of a telnet command, split across reads
        self.authorized = True      # has given the room password, if there is one
        self.operator = False
        self.strikes = 0            # wrong passwords
        self.lines = 0              # lines handled
        self.since = self.active_at = time.monotonic()  # connected; last said a line
        self.away = None            # why, while away
        self.muted = None           # by whom, while muted
        self.ignoring = set()       # Peers it does not want to hear (by object: renames
        self.ignored_by = set()     # follow), and those that do not want to hear it
        self.replies_to = None      # who last sent it a private message
        self.http = False           # its first bytes were an HTTP request: being answered
        self.websocket = None       # a WebSocketReader, if it is a WebSocket
        self.told_last = False      # its last words are queued (a drop with linger, or a
                                    # WebSocket close frame): nothing more may follow them
        self.heard_at = self.since  # when it last sent anything (WebSockets are pinged)
        self.pinged = None          # when a ping went to it since, if one did
        self.session = None         # a Session: what lets it resume
        self.lost_at = None         # when its connection was lost, while it may resume
        self.home = None            # for a person on another server (--redis): its id
        self.claimed = 0.0          # when it took its name (time.time()): the earlier wins

    def wanted_events(self):
        """The selector events this peer needs now: read unless paused or
        finished; write only while output is waiting."""
        if self.handshaking:
            return selectors.EVENT_WRITE if self.wants_write else selectors.EVENT_READ
        events = 0
        if not (self.paused or self.eof):
            events |= selectors.EVENT_READ
        if self.outbuf:
            events |= selectors.EVENT_WRITE
        return events

    def next_line(self, max_line):
        """Remove the next complete line from inbuf and return it: None if
        there is none yet, TOO_LONG if it is longer than max_line."""
        end = self.inbuf.find(b'\n')
        if end < 0:
            return None
        line = bytes(self.inbuf[:end])
        del self.inbuf[:end + 1]  # cheap: bytearray deletes from the front in place
        if self.skipping:         # the tail of a line already refused
            self.skipping = False
            return b''
        if len(line) > max_line and len(line.rstrip(b'\r')) > max_line:
            return TOO_LONG
        return line

    def trim_unfinished_line(self, max_line):
        """Bound the memory of a line that never ends: once its unfinished
        part is longer than max_line, forget it.  True if it was just refused."""
        if b'\n' in self.inbuf or len(self.inbuf) <= max_line + 1:  # +1: a CR
            return False
        del self.inbuf[:]
        refused, self.skipping = not self.skipping, True
        return refused


class History:
    """A room's recent public lines, encoded, with when they were said: at
    most most lines, and at most max_bytes in all (--history 1000000 of 4
    KiB lines must not keep gigabytes that no one will be shown).  Kept as
    the blobs they were said in (a read's lines, as the fast path encodes
    them), split into (stamp, line) only when someone asks: a busy room
    pays one append per read.  A line is replayed as "[STAMP] LINE"."""

    def __init__(self, most, max_bytes):
        self.most = most
        self.max_bytes = max_bytes
        self.blobs = collections.deque()  # (stamp, lines, how many)
        self.count = 0
        self.size = 0

    def __iter__(self):
        for stamp, blob, _ in self.blobs:
            for line in blob.splitlines(True):
                yield stamp, line

    def __len__(self):
        return self.count

    def __reversed__(self):
        for stamp, blob, _ in reversed(self.blobs):
            for line in reversed(blob.splitlines(True)):
                yield stamp, line

    def add_older(self, said):
        """Lines said before all those here ((stamp, lines), oldest first)."""
        newer = [(stamp, lines) for stamp, lines, _ in self.blobs]
        self.blobs.clear()
        self.count = self.size = 0
        for stamp, lines in said + newer:
            self.add(stamp, lines)

    def add(self, stamp, lines):
        """lines: one or more, each ending in a newline."""
        count = lines.count(b'\n')
        self.blobs.append((stamp, lines, count))
        self.count += count
        self.size += len(lines)
        while self.size > self.max_bytes:  # whole blobs: a bound, not a target
            _, blob, count = self.blobs.popleft()
            self.size -= len(blob)
            self.count -= count
        while self.count > self.most:  # the oldest lines, exactly
            stamp, blob, count = self.blobs.popleft()
            over = self.count - self.most
            if over < count:
                rest = blob.split(b'\n', over)[-1]
                self.blobs.appendleft((stamp, rest, count - over))
                self.size -= len(blob) - len(rest)
                self.count -= over
            else:
                self.size -= len(blob)
                self.count -= count

    def position(self):
        """Where the history ends now, in terms a restart keeps (the data
        log has the stamps): the last line's stamp and how many lines end
        with it; (b'-', 0) while empty."""
        last, count = b'-', 0
        for stamp, _, lines in reversed(self.blobs):
            if count and stamp != last:
                break
            last, count = stamp, count + lines
        return last, count

    def since(self, position):
        """The (stamp, line) said after position: everything kept, if it is
        older than all of them."""
        stamp, count = position
        entries = list(self)
        for index, (said, _) in enumerate(entries):
            if said > stamp or (said == stamp and count <= 0):
                return entries[index:]
            if said == stamp:
                count -= 1
        return []


def replayed(entry):
    """A history line as it is sent again: with when it was said, in UTC."""
    return b'[%s] %s' % entry


STAMP_FORMAT = '%Y-%m-%dT%H:%M:%SZ'


def utc_stamp(seconds):
    """ISO 8601, UTC, to the second: what the data log and replays carry."""
    return time.strftime(STAMP_FORMAT, time.gmtime(seconds)).encode()


def stamp_seconds(stamp):
    """The time a utc_stamp() text says, in seconds; None if it says none."""
    try:
        return calendar.timegm(time.strptime(stamp, STAMP_FORMAT))
    except (ValueError, OverflowError):
        return None


class Room:
    """A room: who is in it, what was said in it lately, and what is said in
    it during the current loop turn.

    Lines broadcast in a turn are collected in batch and joined once at the
    end of the turn (deliver), so a message is encoded once and costs each
    member a share of one send().  A member that was also queued something
    of its own this turn (a reply, a private message) is given the batch's
    lines in its outbuf instead, in order (catch_up).  Joins and leaves are
    announced together when they come close together (announce_soon).
    While a member lags (behind), the room's input waits (holding).  A
    member who ignores someone gets the batch without that one's lines."""

    def __init__(self, server, name, history):
        self.server = server
        self.name = name            # as first typed, without the "#"
        self.shown = '#' + name     # how rooms are shown
        self.key = name_key(name)
        self.topic = ''
        self.members = {}           # name_key -> Peer
        # /history reaches HISTORY_MAX_LINES back, within one backlog cap;
        # a newcomer is replayed --history of them, within one turn's share.
        self.history = History(max(history, HISTORY_MAX_LINES) if history else 0,
                               server.max_backlog)
        self.topic_said = None      # (stamp, notice line) that set the topic, for the data log
        # What it said lately, for sessions that resume: (first line number,
        # sender, lines, how many), within SAID_KEEP_SHARE backlog caps (and
        # once no one is in it, within Server.bound_kept_said's).
        self.said = collections.deque()
        self.said_bytes = 0
        self.seq = 0                # lines said in it, ever: the number of the next
        self.said_from = 0          # the first line number still in said
        self.bus_marks = collections.deque()  # --redis: (bus entry, its first line number)
        self.behind = set()         # members with a backlog (Peer.behind_since)
        self.held_until = 0.0       # until when they hold the room's input back
        self.batch = []             # (sender, line) broadcast this turn
        self.batch_bytes = 0
        self.arrivals = {}          # members whose joining is not yet announced, in order
        self.departures = []        # (name, reason) not yet announced
        self.returns = []           # members back from a lost connection, not yet announced
        self.notices_due = 0.0      # announce at once if nothing was since then
        self.notice_timer = False   # a timer will announce the pending ones
        self.roster = None          # sorted (key, peer) of the members, or None when stale

    def add(self, peer):
        """peer comes in; the others hear of it soon, and not at once: a
        client that names itself first thing is announced by that name."""
        if not self.members:
            self.server.kept_rooms.pop(self.key, None)
        self.members[peer.key] = peer
        peer.room = self
        # It must not be handed the lines broadcast earlier this turn.
        peer.turn, peer.batch_pos = self.server.turn, len(self.batch)
        self.roster = None
        self.note_behind(peer)
        if len(self.members) > 1:  # in an empty room there is no one to tell
            self.arrivals[peer] = None
            self.notices_due = max(self.notices_due, time.monotonic() + NOTICE_INTERVAL_SEC)
            self.announce_soon()

    def remove(self, peer, reason):
        """peer goes (reason: why, or "for #room"); the others hear it,
        unless they never heard it came.  An empty room is forgotten, its
        history with it; the lobby stays."""
        del self.members[peer.key]
        peer.room = None
        self.roster = None
        self.note_behind(peer)
        if peer in self.arrivals:
            del self.arrivals[peer]
        else:
            self.departures.append((peer.name, reason))
            self.announce_soon()
        if not self.members:
            self.server.keep_empty(self)

    def durable(self):
        """With --data or --redis, a room that has history or a topic
        outlives its last member (up to a limit: Server.keep_empty)."""
        return (self.server.data is not None or self.server.link is not None) and bool(
            len(self.history) or self.topic)

    def last_said(self):
        """The stamp of its last line or topic (b'' if it has neither)."""
        stamps = [self.history.blobs[-1][0]] if self.history.blobs else []
        if self.topic_said:
            stamps.append(self.topic_said[0])
        return max(stamps, default=b'')

    def note_behind(self, peer):
        """peer came, went, fell behind or caught up: recompute how long the
        room's input waits for its laggards (each for BEHIND_GRACE_SEC)."""
        if peer.behind_since is not None and peer.room is self:
            self.behind.add(peer)
        else:
            self.behind.discard(peer)
        self.held_until = max([p.behind_since + BEHIND_GRACE_SEC for p in self.behind]
                              or [0.0])

    def holding(self):
        """True while the room's input waits for a member to catch up."""
        return bool(self.behind) and time.monotonic() < self.held_until

    def rename(self, peer, old_key):
        del self.members[old_key]
        self.members[peer.key] = peer
        self.roster = None

    # What is said ------------------------------------------------------------

    def say(self, peer, lines):
        """Public lines from peer.  Linked (--redis), they go through Redis
        first and are heard when they come back, in the order every server
        hears them in."""
        link = self.server.link
        if link is None or not link.say(self, peer, lines):
            self.hear(peer, lines)

    def hear(self, sender, lines, stamp=None):
        """Public lines said: remember them, and send them to all but sender."""
        self.remember(lines, stamp)
        self.broadcast(lines, sender=sender)

    def remember(self, lines, stamp=None):
        """Public lines (one or more, each ending in a newline) into the
        history and, with --data, the data log (written before they are sent)."""
        if self.history.most:
            stamp = stamp or self.server.stamp()
            self.history.add(stamp, lines)
            if self.server.data is not None:
                self.server.data.record(stamp, self.shown, lines)
        if not self.members:  # linked: its last member left before the lines came back
            self.server.keep_empty(self)

    def set_topic(self, text, setter):
        """Linked, every server sets it when it comes back from Redis."""
        link = self.server.link
        if link is None or not link.topic(self, text, setter):
            self.set_topic_here(text, setter)

    def set_topic_here(self, text, setter):
        self.topic = text
        notice = notice_line('%s set the topic: %s' % (setter, text))
        self.topic_said = (self.server.stamp(), notice)
        if not self.members:  # linked: set by someone who has left, or elsewhere; kept
            self.server.keep_empty(self)  # as said in now (Room.last_said)
        if self.server.data is not None:
            self.server.data.record(self.topic_said[0], self.shown, notice)
        self.broadcast(notice)

    def broadcast(self, line, sender=None):
        """Queue line for every member but sender, to go at the end of this
        turn joined with the turn's other lines.  Pending joins and leaves
        go first: no one hears a newcomer speak before hearing it came."""
        if self.arrivals or self.departures or self.returns:
            self.announce()
        if not self.batch:
            self.server.busy_rooms.append(self)
        self.batch.append((sender, line))
        self.batch_bytes += len(line)
        if self.server.resume_for:
            self.keep_said(sender, line)
        if sender is not None and sender.sock is not None:
            self.catch_up(sender)  # so deliver knows it must skip this line

    def keep_said(self, sender, lines):
        """Number lines and keep them for a while, for sessions that resume."""
        count = lines.count(b'\n')
        if not self.members:  # no session can want it (its runs here ended as it left)
            self.seq += count
            if not self.said:
                self.said_from = self.seq
            return
        self.said.append((self.seq, sender, lines, count))
        self.seq += count
        self.said_bytes += len(lines)
        if self.said_bytes > self.server.max_backlog * SAID_KEEP_SHARE:  # (a call saved
            self.trim_said(self.server.max_backlog * SAID_KEEP_SHARE)  # per line, mostly)

    def trim_said(self, most):
        """Keep at most most bytes of what the room said, the newest; the
        older lines are forgotten (Session counts them as numbered)."""
        while self.said_bytes > most:
            first, _, gone, count = self.said.popleft()
            self.said_bytes -= len(gone)
            self.said_from = first + count if self.said else self.seq  # (and any gap)
        dropped = None
        while self.bus_marks and self.bus_marks[0][1] < self.said_from:
            dropped = self.bus_marks.popleft()
        if dropped is not None:  # the newest forgotten entry, as the first kept line's:
            self.bus_marks.appendleft((dropped[0], self.said_from))  # (Link.missed: gone)

    def catch_up(self, peer):
        """Copy this turn's lines that peer has not had into its outbuf."""
        if peer.turn != self.server.turn:
            peer.turn, peer.batch_pos = self.server.turn, 0
        for sender, line in self.batch[peer.batch_pos:] if not peer.told_last else ():
            if sender is not peer and not ignores(peer, sender, line):
                peer.outbuf += line if peer.websocket is None else text_frames(line)
                self.server.lines_out += line.count(b'\n')  # a read's lines come as one
        peer.batch_pos = len(self.batch)

    def deliver(self):
        """End of turn: join the batch once; a member with nothing else
        queued gets those same bytes in one send() of its own."""
        everything = b''.join(line for _, line in self.batch)
        server, senders, framed = self.server, None, None
        lines_in_batch = everything.count(b'\n')  # for the count (an ignorer's copy: all)
        for peer in self.members.values():
            if peer.sock is None or peer.told_last:  # nothing may follow its last words
                continue
            lines = everything
            if peer.ignoring:  # the rare member who ignores someone: its own copy
                if senders is None:
                    senders = {sender for sender, _ in self.batch}
                if peer.ignoring & senders:
                    lines = b''.join(line for sender, line in self.batch
                                     if not ignores(peer, sender, line))
            if peer.websocket is not None:  # framed once for all WebSockets here
                if lines is not everything:
                    lines = text_frames(lines)
                else:
                    framed = lines = framed or text_frames(everything)
            if peer.turn == server.turn:  # it has its own order: use its outbuf
                self.catch_up(peer)
                server.dirty.add(peer)
            elif peer.outbuf:
                peer.outbuf += lines
                server.dirty.add(peer)
                server.lines_out += lines_in_batch
            elif lines:
                server.send_fresh(peer, lines)
                server.lines_out += lines_in_batch
        self.batch = []
        self.batch_bytes = 0

    # Joins and leaves --------------------------------------------------------

    def announce_soon(self):
        """Announce pending joins and leaves now if the room has been quiet
        for NOTICE_INTERVAL_SEC, else at the end of that interval, together."""
        now = time.monotonic()
        if now >= self.notices_due:
            self.announce()
        elif not self.notice_timer:
            self.notice_timer = True
            self.server.call_later(self.notices_due - now, self.announce)

    def announce(self, _=None):
        """Broadcast the joins and leaves not yet announced: one line for
        each kind, naming the first NOTICE_NAMES and counting the rest.  A
        big room hears them less often, so a storm costs O(N) bytes.  Leaves
        come first: someone who left and came back is last heard to come
        (one who came and left was never announced, Room.remove)."""
        arrivals, self.arrivals = list(self.arrivals), {}
        departures, self.departures = self.departures, []
        returns = [peer for peer in self.returns if peer.room is self and (
            peer.sock is not None or peer.home is not None)]
        self.returns = []
        self.notice_timer = False
        self.notices_due = time.monotonic() + max(
            NOTICE_INTERVAL_SEC, len(self.members) / NOTICE_DELIVERIES_PER_SEC)
        if len(departures) == 1:
            name, reason = departures[0]
            if reason == LOST_NOTE:  # not in what it is sent if it comes back
                self.broadcast(notice_line('%s %s' % (name, LOST_NOTE)),
                               sender=self.members.get(name_key(name)))
            else:
                self.broadcast(notice_line(('%s left %s' if reason.startswith('for #')
                                            else '%s left (%s)') % (name, reason)))
        elif departures:
            self.broadcast(notice_line('%d people left: %s' % (len(departures), name_list(
                ['%s (%s)' % departure for departure in departures], NOTICE_NAMES))))
        if len(arrivals) <= NOTICE_ONE_BY_ONE:  # each newcomer has its welcome instead
            for peer in arrivals:
                self.broadcast(notice_line('%s joined' % peer.name), sender=peer)
        else:
            self.broadcast(notice_line('%d people joined: %s' % (
                len(arrivals), name_list([p.name for p in arrivals], NOTICE_NAMES))))
        if len(returns) <= NOTICE_ONE_BY_ONE:
            for peer in returns:
                self.broadcast(notice_line('%s is back' % peer.name), sender=peer)
        else:
            self.broadcast(notice_line('%d people are back: %s' % (
                len(returns), name_list([p.name for p in returns], NOTICE_NAMES))))

    # What a member is told ---------------------------------------------------

    def welcome_list(self):
        """Who is here, for a newcomer, in the order they came: everyone in a
        small room; in a big one a few names and a count, so that a join
        costs O(1), not O(room)."""
        names = [p.name for p in itertools.islice(self.members.values(), WELCOME_NAMES)]
        more = ' (/who lists them)' if len(self.members) > WELCOME_NAMES else ''
        return notice_line('%d online in %s: %s%s' % (
            len(self.members), self.shown, name_list(names, WELCOME_NAMES, len(self.members)),
            more))

    def recent_history(self, budget, peer=None, most=None):
        """The newest history lines (at most most, or --history), as
        replayed, that fit budget bytes: a newcomer must not start life over
        its backlog cap (--history 100 of 4 KiB lines).  None of those said
        by someone peer ignores."""
        ignored = [said_by(other.name) for other in peer.ignoring] if peer else []
        prefixes = tuple(prefix for pair in ignored for prefix in pair)
        replay, size = [], 0
        most = self.server.history if most is None else most
        for entry in itertools.islice(reversed(self.history), most if not ignored else None):
            if ignored and entry[1].startswith(prefixes):
                continue
            line = replayed(entry)
            size += len(line)
            if size > budget or len(replay) == most:
                break
            replay.append(line)
        return replay[::-1]

    def names_matching(self, pattern):
        """The members whose name_key holds pattern, sorted (the sort is
        kept until the room changes), each marked if away, or if its
        connection was lost (it may come back)."""
        if self.roster is None:
            self.roster = sorted(self.members.items())
        return [peer.name + (' (lost)' if peer.lost_at is not None else
                             ' (away)' if peer.away is not None else '')
                for key, peer in self.roster if pattern in key]


class Session:
    """What a peer was sent since its resume token, so that a client whose
    connection is lost can come back and get exactly what it missed.  The
    stream is kept as runs, in order: lines its room said (by the room's
    line numbers, Room.said; with whom the peer ignored then) and lines
    sent to it alone; a client says how many lines it has had since the
    token (/resume TOKEN N).  Exact while the rooms keep the lines (Room.said:
    SAID_KEEP_SHARE backlog caps each); older ones are counted as a room
    numbered them, which may count a few the peer never had."""

    __slots__ = ('token', 'digest', 'peer', 'runs', 'direct_bytes', 'skipped', 'loss_run',
                 'restored', 'bus_mark', 'private_mark', 'ignore_spans', 'lost_mark', 'apart')

    def __init__(self, peer, digest=None):
        self.token = None if digest else secrets.token_urlsafe(16)  # 128 random bits
        self.digest = digest or token_digest(self.token)  # what is kept of it
        self.peer = peer
        # After a restart (--data): where its room's log stood at the
        # session's last record and at the restart (History.position).
        self.restored = None
        self.runs = collections.deque()   # [room, first, end or None, ignoring] or [None, bytes]
        self.direct_bytes = 0
        self.skipped = 0            # lines of runs forgotten (over the budget)
        self.loss_run = None        # the first run after the connection was lost
        self.bus_mark = b'0-0'      # --redis: the last bus entry heard when the token
        self.moved(peer.room)       # was given or the room entered (Link.missed)
        self.private_mark = b'0-0'  # ... when the token was given: a client counts its
        # room's lines from the room's notice, but private messages from the token
        # --redis: whom it ignored, from which bus entry to which (None: on),
        # as [Peer, name when it ended, first, last]: its client did not count
        # their lines then (Link.missed).  Those ignored now, from the start.
        self.ignore_spans = [[other, other.name, b'0-0', None] for other in peer.ignoring]
        self.lost_mark = None       # --redis: the last bus entry heard when the connection
        # was lost: a /resume without counts on another server gets what came after
        self.apart = False          # --redis: the link was down since the token, so its
        # client's counts hold lines that never went on the bus: not to be trusted there

    def moved(self, room):
        """The peer is in room now, or ignores other people: a new run."""
        self.close_run()
        self.drop_empty_run()
        self.runs.append([room, room.seq, None, frozenset(self.peer.ignoring)])
        self.bound()

    def ignores(self, other, entry):
        """--redis: the peer ignores other from after bus entry on."""
        self.ignore_spans.append([other, other.name, entry, None])

    def hears_again(self, other, entry, name=None):
        """--redis: ... and hears other (called name until now) again after
        bus entry.  Of the spans that ended, SESSION_MAX_ENDED_IGNORES are kept."""
        for span in self.ignore_spans:
            if span[0] is other and span[3] is None:
                span[:] = None, name or other.name, span[2], entry
        ended = [span for span in self.ignore_spans if span[3] is not None]
        for span in ended[:-SESSION_MAX_ENDED_IGNORES]:
            self.ignore_spans.remove(span)

    def renamed(self, other, old, entry):
        """--redis: other, whom the peer ignores, was called old until bus
        entry (its lines are told apart by name)."""
        if other in self.peer.ignoring:
            self.hears_again(other, entry, old)
            self.ignores(other, entry)

    def mark_loss(self):
        """The connection is lost: what comes from now on is what a person
        who resumes without a count (/resume TOKEN) is sent."""
        self.moved(self.peer.room)
        self.loss_run = self.runs[-1]

    def drop_empty_run(self):
        """A closed room run that got no line is no run (unless it marks the loss)."""
        run = self.runs[-1] if self.runs else None
        if run and run[0] is not None and run[1] == run[2] and run is not self.loss_run:
            self.runs.pop()

    def close_run(self):
        """The peer gets no more of its room's lines in this run (it leaves,
        or is sent a line of its own)."""
        if self.runs:
            run = self.runs[-1]
            if run[0] is not None and run[2] is None:
                run[2] = run[0].seq

    def direct(self, data):
        """Lines sent to the peer alone: they come after its room's lines so far."""
        self.close_run()
        self.drop_empty_run()  # no room line since the last direct one: one run
        runs = self.runs
        if runs and runs[-1][0] is None:
            runs[-1][1] += data
        else:
            runs.append([None, bytearray(data)])  # grows in place
        self.direct_bytes += len(data)
        if self.peer.room is not None:
            self.moved(self.peer.room)
        self.bound()

    def bound(self):
        """At most SESSION_MAX_RUNS runs and a few backlog caps of its own
        lines: the oldest go, counted."""
        budget = self.peer.room.server.max_backlog * SAID_KEEP_SHARE if self.peer.room else 0
        while len(self.runs) > 1 and (len(self.runs) > SESSION_MAX_RUNS
                                      or self.direct_bytes > budget):
            run = self.runs[0]  # the last, live one stays
            excess = self.direct_bytes - budget
            if run[0] is None and len(self.runs) <= SESSION_MAX_RUNS and excess < len(run[1]):
                cut = run[1].find(b'\n', excess - 1) + 1  # its oldest lines are enough
                self.skipped += run[1].count(b'\n', 0, cut)
                self.direct_bytes -= cut
                del run[1][:cut]
                break
            self.runs.popleft()
            if run[0] is None:
                self.direct_bytes -= len(run[1])
                self.skipped += run[1].count(b'\n')
            else:
                self.skipped += run[2] - run[1]  # as numbered: see the class

    def room_lines(self, run):
        """The lines of a room run that the peer was sent: not its own, nor
        from those it ignored then.  From the newest back: runs are recent."""
        room, start, end, ignoring = run
        end = room.seq if end is None else end
        lines = []
        for first, sender, blob, count in reversed(room.said):
            if first + count <= start:
                break
            if first >= end or sender is self.peer:
                continue
            for number, line in reversed(list(enumerate(blob.splitlines(True), first))):
                if start <= number < end and not (
                        sender in ignoring and not line.startswith(b'-!- ')):
                    lines.append(line)
        return lines[::-1]

    def before_restart(self, heard):
        """After a restart: the room lines the data log has from the
        session's record to the restart, as replayed lines, but its own and
        the first heard (as many as its client says it had)."""
        start, end = self.restored
        history, own = self.peer.room.history, said_by(self.peer.name)
        since = history.since(start)
        said = since[:len(since) - len(history.since(end))]
        return [replayed(entry) for entry in said if not entry[1].startswith(own)][heard:]

    def lines(self, first=None):
        """Every line of the stream still known, in order (from the run
        first on, if given and still kept); and how many came before them
        that are forgotten (over a budget, or no longer kept by their room)."""
        runs, forgotten = list(self.runs), self.skipped
        for index, run in enumerate(runs):
            if run is first:
                runs, forgotten = runs[index:], 0
                break
        out = []
        for run in runs:
            if run[0] is None:  # direct
                out += run[1].splitlines(True)
                continue
            room, start, end = run[0], run[1], run[2]
            if start < room.said_from:  # the room forgot these (as numbered)
                forgotten += min(room.seq if end is None else end, room.said_from) - start
            out += self.room_lines(run)
        return out, forgotten


def token_digest(token):
    """What the server keeps of a resume token: its SHA-256, so that the
    data directory holds nothing a reader could resume with."""
    return hashlib.sha256(token.encode('utf-8', 'surrogateescape')).hexdigest()


def ignores(peer, sender, line):
    """True if line, broadcast by sender, is one peer does not want: said by
    someone it ignores (notices about them still come)."""
    return sender in peer.ignoring and not line.startswith(b'-!- ')


def said_by(name):
    """How lines someone said start: their public lines and actions."""
    return ('<%s> ' % name).encode(), ('* %s ' % name).encode()


class Gate:
    """Who gets in, and when: address rules and bans before a byte is read,
    the caps on connections, the TLS handshake, a moment to tell a browser
    from a chat client, the room password, and a deadline on each step.  A
    connection that passes is let in (Server.let_in); one that does not is
    closed with its reason logged."""

    def __init__(self, server, tls=None, password=None, op_password=None, allow=(),
                 deny=(), max_per_address=MAX_PER_ADDRESS, max_clients=None):
        self.server = server
        self.tls = tls              # an SSLContext: every peer must speak TLS
        self.password = password    # the room's, or None
        self.op_password = op_password
        self.allow, self.deny = list(allow), list(deny)  # ip_network lists
        self.max_clients = max_clients or default_max_clients()
        self.max_per_address = max_per_address
        self.per_address = collections.Counter()  # open connections per host_of(ip)
        self.guesses = collections.defaultdict(collections.deque)  # host -> times of
        # wrong passwords in the last GUESS_WINDOW_SEC
        self.bans = {}              # ip_network -> Ban
        self.name_bans = {}         # name_key -> Ban, for people banned by name

    def admit(self, sock, address):
        """Take in a new connection: refuse it at once if its address may not
        connect (with one line saying why, if it is banned or the server or
        its address is full); else start its TLS handshake, or listen for
        its first bytes."""
        server = self.server
        ip = address_ip(address)
        refusal, line = self.refusal(ip), None
        if refusal is None:
            host = host_of(ip)
            if len(server.peers) >= self.max_clients:
                refusal = 'server full (%d clients)' % len(server.peers)
            elif (self.max_per_address and not ip.is_loopback
                  and self.per_address[host] >= self.max_per_address):
                refusal = 'too many connections from %s (%d)' % (
                    ip if ip.version == 4 else host, self.max_per_address)
            line = error_line('%s; try later' % refusal) if refusal else None
        elif refusal.startswith('banned'):
            line = error_line('you are ' + refusal)
        if refusal:
            server.log('refused %s: %s' % (printable_address(address), refusal))
            server.refusals[refusal.split(' ')[0].strip('(')] += 1  # denied, banned, server...
            refuse_at_once(sock, line)
            return
        sock.setblocking(False)
        # Chat lines are small and latency matters: no Nagle delay.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        # telnet sends its Data Mark as urgent data: keep it in the stream,
        # where strip_telnet removes it, rather than out of band.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        keep_alive(sock)
        peer = Peer(sock, printable_address(address), server.burst, ip)
        server.peers.add(peer)
        self.per_address[host] += 1
        peer.authorized = self.password is None
        if not peer.authorized:
            server.call_later(PASSWORD_SEC, self.expire_password, peer)
        if self.tls:
            peer.handshaking = True
            server.call_later(TLS_HANDSHAKE_SEC, self.expire_handshake, peer)
        else:
            self.listen_first(peer)
        server.set_interest(peer)

    def refusal(self, ip):
        """Why ip may not connect at all (--deny, --allow, a ban), or None."""
        if any(ip in network for network in self.deny):
            return 'denied (--deny)'
        if self.allow and not any(ip in network for network in self.allow):
            return 'not allowed (--allow)'
        self.expire_bans()
        for network, ban in self.bans.items():
            if ip in network:
                return 'banned %s' % ban.until_text()
        return None

    def forget(self, peer):
        """peer no longer counts against --max-clients and --max-per-address."""
        peers = self.server.peers
        if peer in peers:
            peers.remove(peer)
            host = host_of(peer.ip)
            self.per_address[host] -= 1
            if not self.per_address[host]:
                del self.per_address[host]

    # A browser, TLS and the password --------------------------------------------

    def listen_first(self, peer):
        """Wait up to HTTP_SNIFF_SEC for the connection's first bytes before
        speaking to it: a browser sends its request at once, and must not be
        greeted as a chat client (Server.on_readable judges the bytes).  A
        chat client that speaks first (ours sends an empty line) is let in
        as soon as its bytes arrive."""
        peer.sniffing = True
        self.server.call_later(HTTP_SNIFF_SEC, self.knock, peer)

    def shake_hands(self, peer):
        """Move a TLS handshake on, inside the loop: it never blocks, and
        expire_handshake drops a peer that stalls.  The first byte decides:
        a client that speaks plain text is told so in plain text."""
        server = self.server
        if not isinstance(peer.sock, ssl.SSLSocket):
            try:
                first = peer.sock.recv(1, socket.MSG_PEEK)
            except WOULD_BLOCK:
                return
            except OSError:
                first = b''
            if first != b'\x16':  # not a TLS handshake record
                peer.handshaking = False
                if first:
                    server.log('refused %s: not TLS' % peer.address)
                    peer.outbuf += error_line(NOT_TLS)
                server.drop(peer, 'not TLS', linger=True)
                return
            server.selector.unregister(peer.sock)
            peer.events = 0
            # A reset must read as one (SSLEOFError), not as a clean end:
            # a lost connection may resume, a closed one has left.
            peer.sock = self.tls.wrap_socket(peer.sock, server_side=True,
                                             suppress_ragged_eofs=False,
                                             do_handshake_on_connect=False)
        try:
            peer.sock.do_handshake()
            peer.handshaking = peer.wants_write = False
        except ssl.SSLWantReadError:
            peer.wants_write = False
        except ssl.SSLWantWriteError:
            peer.wants_write = True
        except OSError as exc:  # ssl.SSLError among them
            server.log('TLS handshake with %s failed: %s'
                       % (peer.address, getattr(exc, 'reason', None) or exc))
            server.lose(peer, 'TLS handshake failed')
            return
        if not peer.handshaking:
            server.unread.add(peer)  # input may have come with the handshake
            self.listen_first(peer)
        server.set_interest(peer)

    def knock(self, peer):
        """HTTP_SNIFF_SEC of silence: not a browser's request.  Ask for the
        password, or for a first line: a connection joins the room only
        once it has said something, because browsers open spare connections
        that never speak (Chromium keeps one beside each page it loads), and
        those must not show up as guests.  Its first line is then handled as
        any other, so an nc user who just types loses nothing."""
        if not peer.sniffing or peer.sock is None or peer.close_reason is not None:
            return  # spoke already, or dropped (banned, say) while it waited
        if peer.authorized:
            self.server.queue(peer, notice_line(ENTER_TO_JOIN))
        else:
            self.open_door(peer)

    def open_door(self, peer):
        """The connection has spoken first, or is asked for the password:
        let it in, or ask (and show it nothing of the room until then)."""
        if not peer.sniffing or peer.sock is None or peer.close_reason is not None:
            return  # done already, or dropped (banned, say) while it waited
        peer.sniffing = False
        self.greet(peer)

    def greet(self, peer):
        """Let peer in, or ask it for the password."""
        if peer.authorized:
            self.server.let_in(peer)
        else:
            self.server.queue(peer, notice_line(PASSWORD_PROMPT))

    def expire_handshake(self, peer):
        if peer.handshaking and peer.sock is not None:
            self.server.log('dropped %s: no TLS handshake in %d s'
                            % (peer.address, TLS_HANDSHAKE_SEC))
            self.server.lose(peer, 'TLS handshake too slow')

    def expire_password(self, peer):
        if not peer.authorized and peer.sock is not None and peer.close_reason is None:
            self.server.log('dropped %s: no password in %d s' % (peer.address, PASSWORD_SEC))
            self.server.queue(peer, error_line('no password in %d s: goodbye' % PASSWORD_SEC))
            self.server.drop(peer, 'no password', linger=True)

    def try_password(self, peer, secret):
        """/pass: the right room password lets peer in."""
        if same_secret(secret, self.password):
            peer.authorized = True
            self.server.log('%s gave the room password' % peer.address)
            self.server.queue(peer, notice_line(PASSWORD_ACCEPTED))
            self.server.let_in(peer)
        else:
            self.strike(peer, 'wrong password')

    def strike(self, peer, what):
        """A wrong password: say so; the third closes the connection, and
        GUESSES_PER_HOST from one host within GUESS_WINDOW_SEC (over any
        connections) shut the door on that host for a while.  Those already
        in stay: a guesser must not be able to evict its neighbours."""
        server = self.server
        peer.strikes += 1
        left = PASSWORD_TRIES - peer.strikes
        server.log('%s from %s (%d tries left)' % (what, peer.address, left))
        if left > 0:
            server.queue(peer, error_line('%s (%d tries left)' % (what, left)))
        else:
            server.queue(peer, error_line('%s: goodbye' % what))
            server.drop(peer, 'too many wrong passwords', linger=True)
        if peer.ip.is_loopback:
            return  # everyone on this machine shares the address
        host, now = host_of(peer.ip), time.monotonic()  # reconnecting buys no guesses
        times = self.guesses[host]
        times.append(now)
        while times[0] <= now - GUESS_WINDOW_SEC:
            times.popleft()
        if len(times) >= GUESSES_PER_HOST:
            del self.guesses[host]
            server.log('banned %s for %d s after %d wrong passwords'
                       % (host, GUESS_BAN_SEC, GUESSES_PER_HOST))
            self.bans[host] = Ban(str(host), GUESS_BAN_SEC)

    # Bans ----------------------------------------------------------------------

    def ban(self, network, shown, seconds, by):
        """Refuse network for seconds (None: until restart) and close its
        connections, telling each why."""
        self.bans[network] = Ban(shown, seconds, by, self.server.link is not None)
        lost = [peer for peer in self.server.names.values()
                if peer.lost_at is not None and peer.home is None]
        for peer in list(self.server.peers) + lost:  # a lost one may not come back
            if peer.ip in network:
                self.server.queue(peer, error_line('you were banned by %s' % by))
                self.server.drop(peer, 'banned by %s' % by, linger=True)

    def ban_person(self, peer, seconds, by):
        """Ban one person on a shared address (loopback): their name stays
        theirs to no one until the ban ends, and this connection closes."""
        self.name_bans[peer.key] = Ban(peer.name, seconds, by, self.server.link is not None)
        self.server.queue(peer, error_line('you were banned by %s' % by))
        self.server.drop(peer, 'banned by %s' % by, linger=True)

    def lift(self, what):
        """End the ban on an address, a network or a name; what was banned,
        as it was shown, or None if it was not."""
        network = banned_network(what)
        if network in self.bans:
            return self.bans.pop(network).shown
        if name_key(what) in self.name_bans:
            return self.name_bans.pop(name_key(what)).shown
        return None

    def name_banned(self, key):
        """The ban on a name, or None."""
        self.expire_bans()
        return self.name_bans.get(key)

    def expire_bans(self):
        for bans in (self.bans, self.name_bans):
            for what, ban in list(bans.items()):
                if ban.over():
                    del bans[what]


def endless_ban(linked):
    """How long a ban without minutes lasts (linked: it is kept in Redis)."""
    return 'until lifted' if linked else 'until the server restarts'


class Ban:
    """A ban: what it is shown as (what the operator typed), when it ends,
    and which operator made it (None: too many wrong passwords, a ban of
    this server's own).  Linked (--redis), a ban with no end is kept in
    Redis, so it lasts until /unban rather than until a restart."""

    __slots__ = ('shown', 'until', 'by', 'linked')

    def __init__(self, shown, seconds, by=None, linked=False):
        self.shown, self.by, self.linked = shown, by, linked
        self.until = None if seconds is None else time.monotonic() + seconds

    def over(self):
        return self.until is not None and self.until <= time.monotonic()

    def seconds_left(self):
        return None if self.until is None else max(0.0, self.until - time.monotonic())

    def until_text(self):
        """'until 14:05' (local time), or as endless_ban says."""
        if self.until is None:
            return endless_ban(self.linked)
        return 'until ' + time.strftime('%H:%M', time.localtime(
            time.time() + self.until - time.monotonic() + 59))  # rounded up

    def left_text(self):
        if self.until is None:
            return 'until lifted' if self.linked else 'until restart'
        return plural(int((self.until - time.monotonic()) // 60) + 1, 'minute') + ' left'


def keep_alive(sock):
    """Probe a connection that has been idle KEEPALIVE_IDLE_SEC, so that a
    peer that vanished (a laptop closed, Wi-Fi gone) leaves within a few
    minutes instead of keeping its name for hours.  Probes go out only when
    nothing is unacknowledged; for the other case (it vanished with data on
    the way) Linux's TCP_USER_TIMEOUT bounds the wait the same."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    patience = KEEPALIVE_IDLE_SEC + KEEPALIVE_INTERVAL_SEC * KEEPALIVE_PROBES
    for option, value in (('TCP_KEEPIDLE', KEEPALIVE_IDLE_SEC),  # macOS: TCP_KEEPALIVE
                          ('TCP_KEEPALIVE', KEEPALIVE_IDLE_SEC),
                          ('TCP_KEEPINTVL', KEEPALIVE_INTERVAL_SEC),
                          ('TCP_KEEPCNT', KEEPALIVE_PROBES),
                          ('TCP_USER_TIMEOUT', patience * 1000)):  # milliseconds
        if hasattr(socket, option):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            except OSError:
                pass  # the platform keeps its defaults (Windows: 2 hours)


def refuse_at_once(sock, line):
    """Close a connection that may not come in, after one line saying why (it
    fits the socket's buffer, so a nonblocking send takes it).  Whatever it
    sent is read first: closing with unread input would send a reset, which
    can destroy the line before it is read."""
    try:
        sock.setblocking(False)
        if line:
            sock.send(line)
        drain(sock)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


# Who may use a command: anyone who is in, operators, or also a newcomer
# still at the password prompt.
ANYONE, OPERATORS, AT_THE_DOOR = 'anyone', 'operators', 'at the door'


class Worker:
    """Slow work off the loop: password hashes (about 50 ms each) for
    /register and /nick NAME PASSWORD.  One thread does the jobs in order
    and hands each result back to be used in the loop, which the server's
    wake socket rouses.  At most WORKER_MAX_JOBS wait; past that a job is
    refused, so a flood of passwords costs the guessers time, not the room."""

    def __init__(self, server):
        self.server = server
        self.jobs = queue.Queue()
        self.done = collections.deque()  # (then, peer, result) for the loop
        self.waiting = 0                 # jobs given and not yet handed back
        self.thread = None

    def submit(self, work, then, peer):
        """Run work() off the loop, then then(peer, result) in it (result
        None if work failed); False if too many jobs wait already."""
        if self.waiting >= WORKER_MAX_JOBS:
            return False
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
        self.waiting += 1
        self.jobs.put((work, then, peer))
        return True

    def run(self):
        while True:
            work, then, peer = self.jobs.get()
            try:
                result = work()
            except Exception:  # MemoryError from scrypt, say: the job says so
                result = None
            self.done.append((then, peer, result))
            self.server.wake()

    def finish(self):
        """In the loop: hand the results that came back to their callbacks."""
        while self.done:
            then, peer, result = self.done.popleft()
            self.waiting -= 1
            self.server.guarded(then, peer, result)


def command(usage, what, who=ANYONE, console=False):
    """Mark a cmd_* method as a command: its usage and one-line help (for
    /help, and for a command used wrongly), who may use it, and whether the
    server's console may."""
    def mark(handler):
        handler.usage, handler.what, handler.who, handler.console = usage, what, who, console
        return handler
    return mark


def page_asked(argument):
    """The page number in a command's words ("+2"), else 1."""
    pages = [int(word[1:]) for word in argument.split()
             if word.startswith('+') and NUMBER.match(word[1:])]
    return max(1, pages[-1]) if pages else 1


def page_note(page, count, size, hint):
    """', page 2 of 5 (HINT for page N)' when count things fill several pages."""
    pages = -(-count // size)
    return ', page %d of %d (%s for page N)' % (page, pages, hint) if pages > 1 else ''


def duration(seconds):
    """'45 s', '12 min', '3 h 5 min': how long, roughly."""
    if seconds < 60:
        return '%d s' % seconds
    if seconds < 3600:
        return '%d min' % (seconds // 60)
    return '%d h %d min' % (seconds // 3600, seconds % 3600 // 60)


class Commands:
    """The commands, one handler each, dispatched by name from /WORD to
    cmd_WORD (as http.server does with do_GET).  Mixed into Server: the
    handlers queue output and change the rooms; they never touch a socket."""

    def run_command(self, peer, word, argument):
        """Dispatch /WORD to cmd_WORD, if this peer may use it now."""
        handler = getattr(self, 'cmd_' + word.lower(), None)
        if handler is None:
            refusal = 'unknown command /%s (try /help)' % word
        elif not peer.authorized and handler.who != AT_THE_DOOR:
            refusal = 'send /pass PASSWORD first'
        elif peer is self.console and not handler.console:
            refusal = '/%s is not for the console' % word
        elif handler.who == OPERATORS and not peer.operator:
            refusal = '/%s is for operators (/op PASSWORD)' % word
        else:
            target = self.names.get(name_key(argument.partition(' ')[0]))
            if target is None or target.home is None or handler.__name__ not in self.FORWARDED:
                handler(peer, argument)
            elif not self.link.publish('act', target.name, peer.name, '%s %s' % (
                    handler.__name__[len('cmd_'):], argument)):
                self.queue(peer, error_line('%s is on another server, and the link to it is '
                                            'down' % target.name))
            return
        self.queue(peer, error_line(refusal))

    def usage(self, peer, handler):
        self.queue(peer, error_line('usage: ' + handler.usage))

    # Run by the server the person they name is on (--redis).
    FORWARDED = ('cmd_kick', 'cmd_ban', 'cmd_mute', 'cmd_unmute', 'cmd_rename')

    @command('/help', 'list the commands', console=True)
    def cmd_help(self, peer, argument):
        lines = ['Commands:']
        handlers = [h for name, h in vars(Commands).items() if name.startswith('cmd_')]
        for handler in handlers:
            if handler.who != OPERATORS:
                lines.append('  %-27s %s' % (handler.usage, handler.what))
        lines.append('Operators (/op PASSWORD) also have:')
        for handler in handlers:
            if handler.who == OPERATORS:
                lines.append('  %-27s %s' % (handler.usage, handler.what))
        lines.append('A line starting with / is a command; // says "/..." as text.')
        self.queue(peer, b''.join(notice_line(line) for line in lines))

    # Rooms -------------------------------------------------------------------

    @command('/join ROOM', 'go to a room (made if it is new)')
    def cmd_join(self, peer, argument):
        name = unicodedata.normalize('NFC', argument.strip()).lstrip('#')
        if not name or ' ' in name:
            self.usage(peer, self.cmd_join)
            return
        problem = name_problem(name)
        if problem is not None:
            self.queue(peer, error_line('cannot make the room #%s: %s' % (
                name, problem.replace('a name', 'a room name'))))
        elif name_key(name) == peer.room.key:
            self.queue(peer, error_line('you are in %s already' % peer.room.shown))
        else:
            room = self.room_named(name)
            self.log('%s went from %s to %s' % (peer.name, peer.room.shown, room.shown))
            self.join(peer, room)

    @command('/part', 'go back to the lobby')
    def cmd_part(self, peer, argument):
        if peer.room is self.lobby:
            self.queue(peer, error_line('you are in the lobby; /quit leaves the server'))
        else:
            self.cmd_join(peer, LOBBY)

    @command('/rooms [+PAGE]', 'list the rooms, busiest first', console=True)
    def cmd_rooms(self, peer, argument):
        """A page of ROOMS_PAGE lines, each a room, its size and its topic."""
        page = page_asked(argument)
        rooms = sorted(self.rooms.values(), key=lambda room: (-len(room.members), room.key))
        shown = self.page_of(peer, '/rooms', rooms, page, ROOMS_PAGE)
        if shown is None:
            return
        lines = [notice_line('%s%s:' % (plural(len(rooms), 'room'), page_note(
            page, len(rooms), ROOMS_PAGE, '/rooms +N')))]
        lines += [notice_line('  %s (%d)%s' % (room.shown, len(room.members),
                                              ': ' + room.topic if room.topic else ''))
                  for room in shown]
        self.queue(peer, b''.join(lines))

    @command('/who [#ROOM|TEXT] [+PAGE]', 'who is here, there, or named so',
             console=True)
    def cmd_who(self, peer, argument):
        """Your room, or another (#ROOM, or the name of one), or the people in
        yours whose names hold TEXT; a page (WHO_PAGE_NAMES) at a time.  '+'
        is never part of a name."""
        page, pattern, room = page_asked(argument), '', peer.room or self.lobby
        for word in argument.split():
            other = self.rooms.get(name_key(word.lstrip('#')))
            if word.startswith('+') and NUMBER.match(word[1:]):
                continue
            if word.startswith('#') and other is None:
                self.queue(peer, error_line('there is no room %s (/rooms lists them)' % word))
                return
            if other is not None:
                room = other
            else:
                pattern = name_key(word)
        names = room.names_matching(pattern)
        shown = self.page_of(peer, '/who', names, page, WHO_PAGE_NAMES)
        if shown is None:
            return
        what = '%d online in %s' % (len(room.members), room.shown)
        if pattern:
            what = '%d of %s match "%s"' % (len(names), what, pattern)
        what += page_note(page, len(names), WHO_PAGE_NAMES,
                          '/who %s+N' % (pattern + ' ' if pattern else ''))
        self.queue(peer, notice_line('%s: %s' % (what, ', '.join(shown))))

    def page_of(self, peer, command, things, page, size):
        """Page page of things, size a page; None (and peer told) if there
        is no such page."""
        pages = max(1, -(-len(things) // size))
        if page > pages:
            self.queue(peer, error_line('there is no page %d: %s has %s' % (
                page, command, plural(pages, 'page'))))
            return None
        return things[(page - 1) * size:page * size]

    @command('/history [N]', 'the last N lines of your room (%d, at most %d)' % (
        HISTORY_DEFAULT_LINES, HISTORY_MAX_LINES))
    def cmd_history(self, peer, argument):
        """Lines said in your room before, replayed with when they were said:
        as many of the last N as fit one turn's share of output."""
        if argument and not NUMBER.match(argument):
            self.usage(peer, self.cmd_history)
            return
        asked = min(int(argument or HISTORY_DEFAULT_LINES), HISTORY_MAX_LINES)
        replay = peer.room.recent_history(self.turn_budget, peer, asked)
        if not replay:
            self.queue(peer, notice_line('No history in %s' % peer.room.shown))
            return
        fits = '' if len(replay) == min(asked, len(peer.room.history)) else (
            ' (as many as fit %s)' % human_bytes(self.turn_budget))
        self.queue(peer, notice_line('Last %s%s:' % (plural(len(replay), 'message'), fits)))
        self.queue(peer, b''.join(replay))

    @command('/topic [TEXT]', 'show or set the topic of your room')
    def cmd_topic(self, peer, text):
        room = peer.room
        if not text:
            self.queue(peer, notice_line('Topic of %s: %s' % (room.shown, room.topic)
                                         if room.topic else '%s has no topic' % room.shown))
            return
        if self.refused_if_muted(peer):
            return
        text = text[:MAX_TOPIC_CHARS]
        room.set_topic(text, peer.name)  # (linked, it is set when it comes back from Redis)
        self.log('%s set the topic of %s: %s' % (peer.name, room.shown, text))

    # People ------------------------------------------------------------------

    @command('/nick NAME [PASSWORD]', 'change your name (a registered one needs its '
             'password)')
    def cmd_nick(self, peer, argument):
        name, _, password = argument.partition(' ')
        if not name:
            self.usage(peer, self.cmd_nick)
            return
        name = unicodedata.normalize('NFC', name)
        if password and name_key(name) in self.accounts:
            self.check_password(peer, name, password)
            return
        problem = self.rename(peer, name)
        if problem is not None:
            self.log('%s refused the name %s: %s' % (peer.name, name, problem))
            self.queue(peer, error_line('cannot use the name %s: %s' % (name, problem)))
        elif password:
            self.queue(peer, notice_line('%s is not registered: the password was not used '
                                         '(/register PASSWORD makes the name yours)' % name))

    # Names that belong to someone (--data) -----------------------------------

    def check_password(self, peer, name, password):
        """/nick NAME PASSWORD for a registered name: the hash is checked off
        the loop (password_checked goes on)."""
        if self.in_use(peer, name):
            return
        stored = self.accounts[name_key(name)][1]
        if not self.worker.submit(lambda: password_matches(password, stored),
                                  lambda peer, right: self.password_checked(peer, name, right),
                                  peer):
            self.queue(peer, error_line('the server is busy checking passwords: try again '
                                        'in a moment'))

    def in_use(self, peer, name):
        """True (and peer told) if another connection, not a lost one, has name."""
        holder = self.names.get(name_key(name))
        if holder in (None, peer) or (holder.lost_at is not None and holder.home is None
                                      and holder.close_reason is None):
            return False
        self.queue(peer, error_line('cannot use the name %s: it is in use, from another '
                                    'connection' % name))
        return True

    def password_checked(self, peer, name, right):
        """The password for a registered name was checked: a wrong one counts
        as a wrong room password does (Gate.strike); the right one gives the
        name, and the messages that waited for it.  If its owner's lost
        connection holds it, this connection resumes that one."""
        key = name_key(name)
        if peer.sock is None or peer.close_reason is not None:
            return  # gone meanwhile
        if key not in self.accounts:
            self.queue(peer, error_line('%s is no longer registered' % name))
        elif right is None:
            self.log('cannot check the password of %s: it was registered where hashlib has '
                     'scrypt, and this Python has not' % name)
            self.queue(peer, error_line('this server cannot check the password of %s (its '
                                        'Python lacks scrypt)' % name))
        elif not right:
            self.gate.strike(peer, 'wrong password for the name %s' % name)
        elif self.names.get(key) not in (None, peer):
            if not self.in_use(peer, name):
                self.resume_session(self.names[key], peer)
        else:
            problem = self.rename(peer, name, owner=True)
            if problem is not None:
                self.queue(peer, error_line('cannot use the name %s: %s' % (name, problem)))
            else:
                self.deliver_mail(peer)

    @command('/register PASSWORD', 'make your name yours (it then needs the password)')
    def cmd_register(self, peer, password):
        name = peer.name
        if self.data is None and self.link is None:  # (linked: the names are in Redis)
            self.queue(peer, error_line('this server keeps no names: it runs without --data'))
        elif not password:
            self.usage(peer, self.cmd_register)
        elif peer.key.startswith(GUEST_PREFIX):
            self.queue(peer, error_line('choose a name first (/nick NAME), then register it'))
        elif len(password) < MIN_NAME_PASSWORD_CHARS:
            self.queue(peer, error_line('the password must have at least %d characters'
                                        % MIN_NAME_PASSWORD_CHARS))
        elif not self.worker.submit(lambda: hash_password(password),
                                    lambda peer, hashed: self.registered(peer, name, hashed),
                                    peer):
            self.queue(peer, error_line('the server is busy checking passwords: try again '
                                        'in a moment'))

    def registered(self, peer, name, hashed):
        """The hash for /register is made: keep it, if peer still has the name."""
        if peer.name != name or peer.close_reason is not None:
            return  # renamed or gone meanwhile: nothing to register
        if hashed is None:
            self.queue(peer, error_line('could not register %s: the password hash failed'
                                        % name))
            return
        again = peer.key in self.accounts
        self.accounts[peer.key] = (name, hashed)
        if self.data is not None:
            self.data.people.note('name', name, hashed)
        if self.link is not None:
            self.link.register(name, hashed)
        self.log('%s %s' % (name, 'changed its password' if again else 'registered its name'))
        self.queue(peer, notice_line(
            'The name %s is yours%s: from now on it needs the password (/nick %s PASSWORD, '
            'or the client\'s --name with CHAT_NAME_PASSWORD)' % (
                name, ', with the new password' if again else '', name)))

    @command('/unregister', 'let your name go: anyone may take it again')
    def cmd_unregister(self, peer, argument):
        if peer.key not in self.accounts:
            self.queue(peer, error_line('%s is not registered' % peer.name))
            return
        self.forget_name(peer.key, peer.name)
        self.queue(peer, notice_line('%s is no longer registered' % peer.name))

    @command('/drop NAME', 'take a registered name from its owner', who=OPERATORS,
             console=True)
    def cmd_drop(self, peer, name):
        key = name_key(name) if name else None
        if not name:
            self.usage(peer, self.cmd_drop)
        elif key not in self.accounts:
            self.queue(peer, error_line('%s is not registered' % name))
        else:
            name = self.accounts[key][0]
            self.forget_name(key, peer.name)
            self.queue(peer, notice_line('%s is no longer registered' % name))

    def forget_name(self, key, by):
        """The name is no one's any more; the messages that waited for it go."""
        name, _ = self.accounts.pop(key)
        self.mail.pop(key, None)
        if self.data is not None:
            self.data.people.note('unname', name)
        if self.link is not None:
            self.link.unregister(name)
        self.log('%s is no longer registered (by %s)' % (name, by))

    def leave_mail(self, peer, key, text):
        """/msg to a registered name that is not here: it waits (at most
        MAIL_PER_NAME, for MAIL_KEEP_SEC), and the sender is told.  Linked,
        it waits in Redis, for whichever server its owner comes to."""
        name = self.accounts[key][0]
        if self.link is not None:
            self.link.leave_mail(peer, name, text)
            return
        box = self.mail[key] = fresh_mail(self.mail.get(key, ()))
        if len(box) >= MAIL_PER_NAME:
            self.mail_refused(peer, name)
            return
        box.append((self.stamp(), peer.name, text))
        self.data.people.note('mail', name, peer.name, text)
        self.mail_kept(peer, name, text)

    def mail_kept(self, peer, name, text):
        self.queue(peer, sent_line(name, text))
        self.queue(peer, notice_line('%s is not here: the message waits for them (up to %d '
                                     'days)' % (name, MAIL_KEEP_SEC // 86400)))

    def mail_refused(self, peer, name):
        self.queue(peer, error_line('%s has %d messages waiting already: this one is not '
                                    'kept' % (name, MAIL_PER_NAME)))

    def deliver_mail(self, peer):
        """peer has come in with its registered name: the messages that
        waited for it here (--data), and linked, those in Redis."""
        box = fresh_mail(self.mail.pop(peer.key, ()))
        if box:
            self.hand_mail(peer, box)
            self.data.people.note('read', peer.name)
        if self.link is not None:
            self.link.take_mail(peer)

    def hand_mail(self, peer, box):
        """Waiting messages (stamp, sender, text), as replayed lines."""
        box = fresh_mail(box)
        if box:
            self.queue(peer, notice_line('%s waited for you:' % plural(len(box), 'message'))
                       + b''.join(replayed((stamp, private_line(sender, text)))
                                  for stamp, sender, text in box))

    def rename(self, peer, name, by=None, owner=False):
        """Give peer the name, and tell its room; why not, if it may not.  A
        registered name only to its owner (who gave its password)."""
        key = name_key(name)
        holder = self.names.get(key)
        problem = name_problem(name)
        if problem is None and (key.startswith(GUEST_PREFIX) or key == SERVER_NAME):
            problem = 'the server keeps "%s" and names starting with "%s"' % (
                SERVER_NAME, GUEST_PREFIX)
        if problem is None and holder not in (None, peer):
            problem = 'the name is taken by %s%s' % (holder.name, ', whose connection was lost '
                                                    '(it may come back)' if holder.lost_at else '')
        if problem is None and key in self.accounts and not owner and holder is not peer:
            problem = 'it is registered; give its password: /nick %s PASSWORD' % name
        if problem is None and self.gate.name_banned(key):
            problem = 'the name is banned %s' % self.gate.name_banned(key).until_text()
        if problem is None and name == peer.name:
            problem = 'that is the name already'
        if problem is not None:
            return problem
        if key != peer.key:
            peer.claimed = time.time()
        self.rename_now(peer, name, by)
        return None

    def rename_now(self, peer, name, by=None):
        """peer (here, or a mirror) is called name from now on: its room is told."""
        old, old_key = peer.name, peer.key
        del self.names[old_key]
        peer.name, peer.key = name, name_key(name)
        self.names[peer.key] = peer
        peer.room.rename(peer, old_key)
        self.note_session(peer)
        for other in peer.ignored_by if self.link is not None else ():
            if other.session is not None:
                other.session.renamed(peer, old, self.link.position())
                self.note_session(other)
        self.log('%s is now known as %s%s' % (old, name, ' (renamed by %s)' % by if by else ''))
        renamed = notice_line('%s is now known as %s%s' % (
            old, name, ' (renamed by %s)' % by if by else ''))
        if peer in peer.room.arrivals:  # the others will hear it joined by this name
            if peer.home is None:
                self.queue(peer, renamed)
        else:
            peer.room.broadcast(renamed)
        if self.link is not None and peer.home is None:
            self.link.claim(peer, 'nick', old, name, peer.room.name, peer.claimed)

    @command('/me ACTION', 'say what you are doing')
    def cmd_me(self, peer, action):
        if not action:
            self.usage(peer, self.cmd_me)
        elif not self.refused_if_muted(peer):
            peer.room.say(peer, action_line(peer.name, action))

    def refused_if_muted(self, peer):
        """True (and peer told why) if peer may not speak in public now."""
        if peer.muted is not None:
            self.queue(peer, error_line('you are muted by %s: only private messages to '
                                        'operators go out' % peer.muted))
        return peer.muted is not None

    @command('/msg NAME TEXT', 'a private message, to anyone anywhere')
    def cmd_msg(self, peer, argument):
        name, _, text = argument.partition(' ')
        text = text.strip()
        if not name or not text:
            self.usage(peer, self.cmd_msg)
            return
        recipient = self.names.get(name_key(name))
        if recipient is None and name_key(name) in self.accounts and (
                self.data is not None or self.link is not None):
            if not self.refused_if_muted(peer):
                self.leave_mail(peer, name_key(name), text)
        elif recipient is None:
            self.queue(peer, error_line('no one called %s is online' % name))
        else:
            self.tell(peer, recipient, text)

    @command('/reply TEXT', 'answer the last private message')
    def cmd_reply(self, peer, text):
        recipient = peer.replies_to
        if not text:
            self.usage(peer, self.cmd_reply)
        elif recipient is None or self.names.get(recipient.key) is not recipient:
            self.queue(peer, error_line('no one to reply to: no private message yet, or '
                                        'its sender has left'))
        else:
            self.tell(peer, recipient, text)

    def tell(self, peer, recipient, text):
        """A private message: to recipient (unless it ignores peer, which is
        not told so), confirmed to peer, and with recipient's away reason."""
        if peer.muted is not None and not recipient.operator:
            self.refused_if_muted(peer)
            return
        if recipient.home is None:
            self.hear_private(peer, recipient, text)
        elif not self.link.publish_numbered('pm', lambda: self.queue(peer, error_line(
                'the link to the other servers broke before your message to %s was '
                'confirmed: it may not have gone' % recipient.name)), peer.name,
                recipient.name, text):
            self.queue(peer, error_line('%s is on another server, and the link to it is '
                                        'down: not sent' % recipient.name))
            return
        self.queue(peer, sent_line(recipient.name, text))
        if recipient.lost_at is not None:
            self.queue(peer, notice_line('%s lost the connection: it gets this if it comes back'
                                         % recipient.name))
        elif recipient.away is not None:
            self.queue(peer, notice_line('%s is away: %s' % (recipient.name, recipient.away)))
        if recipient.behind_since is not None and recipient.room.holding():
            self.pause(peer, NUDGE_SEC)  # more would bury a reader that is catching up

    def hear_private(self, sender, recipient, text):
        """A private message for recipient, here; sender may be a mirror.
        Linked, the other servers hear of one sent here too: recipient's
        client counts it, and may resume on one of them (Link.missed)."""
        if sender not in recipient.ignoring:
            self.queue(recipient, private_line(sender.name, text))
            recipient.replies_to = sender
            if self.link is not None and sender.home is None and recipient.session is not None:
                self.link.publish('heard', sender.name, recipient.name, text)

    @command('/away [REASON]', 'say you are away (for /who and /msg)')
    def cmd_away(self, peer, reason):
        peer.away = reason[:MAX_TOPIC_CHARS] or 'away'
        self.queue(peer, notice_line('You are away: %s (/back when you are back)' % peer.away))
        peer.room.roster = None
        if self.link is not None:
            self.link.publish('away', peer.name, peer.away)

    @command('/back', 'say you are back')
    def cmd_back(self, peer, argument):
        if peer.away is None:
            self.queue(peer, error_line('you were not away'))
            return
        peer.away = None
        peer.room.roster = None
        self.queue(peer, notice_line('You are back'))
        if self.link is not None:
            self.link.publish('away', peer.name, '')

    @command('/ignore [NAME]', 'stop hearing NAME (alone: who you ignore)')
    def cmd_ignore(self, peer, name):
        if not name:
            names = sorted(other.name for other in peer.ignoring)
            self.queue(peer, notice_line('You ignore %s' % (', '.join(names) or 'no one')))
            return
        other = self.names.get(name_key(name))
        if other is None:
            self.queue(peer, error_line('no one called %s is online' % name))
        elif other is peer:
            self.queue(peer, error_line('you cannot ignore yourself'))
        else:
            peer.ignoring.add(other)
            if peer.session is not None:
                peer.session.moved(peer.room)  # its lines are filtered from here on
                if self.link is not None:
                    peer.session.ignores(other, self.link.position())
                self.note_session(peer)  # (and on another server it resumes on)
            other.ignored_by.add(peer)
            self.queue(peer, notice_line('You ignore %s: nothing they say reaches you until '
                                         'one of you leaves' % other.name))

    @command('/unignore NAME', 'hear NAME again')
    def cmd_unignore(self, peer, name):
        other = self.names.get(name_key(name)) if name else None
        if other not in peer.ignoring:
            self.queue(peer, error_line('you do not ignore %s' % (name or 'anyone by that name')))
            return
        peer.ignoring.discard(other)
        if peer.session is not None:
            peer.session.moved(peer.room)
            if self.link is not None:
                peer.session.hears_again(other, self.link.position())
            self.note_session(peer)
        other.ignored_by.discard(peer)
        self.queue(peer, notice_line('You hear %s again' % other.name))

    @command('/whois NAME', 'where NAME is, idle time, away...', console=True)
    def cmd_whois(self, peer, name):
        other = self.names.get(name_key(name)) if name else None
        if other is None:
            self.queue(peer, error_line('no one called %s is online' % name) if name
                       else error_line('usage: ' + self.cmd_whois.usage))
            return
        now = time.monotonic()
        facts = ['in %s' % other.room.shown] + (
            ['on another server'] if other.home is not None else
            ['here %s' % duration(now - other.since), 'idle %s' % duration(now - other.active_at)])
        if other.lost_at is not None:
            facts.append(LOST_NOTE)
        if other.away is not None:
            facts.append('away: %s' % other.away)
        if other.home is None:
            facts.append('TLS' if self.gate.tls else 'not encrypted')
        if other.operator:
            facts.append('operator')
        if other.muted is not None:
            facts.append('muted')
        if peer.operator and other.home is None:  # where people are from: operators only
            facts.append('from %s' % other.address)
        self.queue(peer, notice_line('%s: %s' % (other.name, ', '.join(facts))))

    @command('/motd', 'show the message of the day')
    def cmd_motd(self, peer, argument):
        lines = self.motd or ['There is no message of the day.']
        self.queue(peer, b''.join(notice_line(line) for line in lines))

    @command('/quit [REASON]', 'leave', who=AT_THE_DOOR)
    def cmd_quit(self, peer, reason):
        self.queue(peer, notice_line(GOODBYE))
        self.drop(peer, 'quit: %s' % reason if reason else 'quit', linger=True)

    @command('/resume TOKEN [N [P [M]]]', 'come back after a lost connection (N: lines '
             'you got since the token; P: of them, public lines of your room since you '
             'entered it; M: private messages since the token; without them, what was said '
             'while you were away)', who=AT_THE_DOOR)
    def cmd_resume(self, peer, argument):
        token, seen, heard, privately = (argument.split() + ['', '', '', ''])[:4]
        owner = self.sessions.get(token_digest(token))
        if not all(NUMBER.match(count) for count in (seen, heard, privately) if count):
            owner = None
        elif owner is None and self.link is not None and self.link.up:
            # Redis may know it: a session of another server (that server may be gone).
            self.link.find_session(peer, token_digest(token), int(heard) if heard else None,
                                   int(privately) if privately else 0)
            return
        if (owner is None or owner is peer or owner.close_reason is not None  # leaving now
                or self.gate.name_banned(owner.key)):
            self.refuse_resume(peer)
            return
        self.resume_session(owner, peer, int(seen) if seen else None,
                            int(heard) if heard else None)

    def refuse_resume(self, peer):
        self.log('%s: no session to resume' % (peer.name or peer.address))
        self.queue(peer, error_line('cannot resume: no such session (it may have '
                                    'ended or expired)'))
        if peer.key is None:
            self.gate.open_door(peer)  # in as a newcomer, then

    def resume_from_elsewhere(self, peer, mirror, missed, gone):
        """peer resumes the session of mirror, a person of another server
        (--redis; that server may be gone): mirror becomes this server's,
        with peer's connection, and is sent what it missed (Link.missed)."""
        mirror.home = None
        mirror.tokens, mirror.tokens_at = self.burst, time.monotonic()
        self.take_over(mirror, peer)
        self.queue(mirror, notice_line('You are back as %s in %s: %s you missed%s' % (
            mirror.name, mirror.room.shown, plural(len(missed), 'line'), gone)))
        self.queue(mirror, b''.join(missed))
        self.give_session(mirror)
        self.back(mirror)
        self.link.publish('moved', mirror.name, repr(mirror.claimed),
                          json.dumps(self.link.person_state(mirror)))
        self.log('%s resumed from %s, from another server (%d lines)' % (
            mirror.name, mirror.address, len(missed)))

    def back(self, peer):
        """peer's connection was lost, and it is back: its room hears it."""
        if peer.lost_at is not None:
            peer.lost_at = None
            peer.room.returns.append(peer)  # told with other comings and goings
            peer.room.announce_soon()
            peer.room.roster = None

    def hand_over(self, peer, home):
        """peer resumed on server home (--redis): here it is one of home's
        now, and its old connection, if it still had one, closes unannounced."""
        if peer.sock is not None:
            self.close(peer)
        self.end_session(peer)
        if peer in self.doomed:  # leaving as it went: it is the other server's to announce
            self.doomed.remove(peer)
        peer.home, peer.close_reason = home, None  # (if lost, Link.on_moved says it is back)

    def resume_session(self, owner, peer, seen=None, heard=None):
        """peer's connection becomes owner's, and is sent what owner missed:
        after the first seen lines since its token (or, without a count,
        what came since the loss).  After a restart the server knows only
        the room's logged lines from before it: the client's count of its
        room's public lines (heard) says which of those it had."""
        session = owner.session
        if session.restored is not None:
            lines, lost = session.lines(session.loss_run)  # since the restart
            missed = (session.before_restart(heard) if heard is not None else []) + lines
        else:
            if seen is not None:
                lines, forgotten = session.lines()
            elif owner.lost_at is not None:  # typed by a person: what came since the loss
                lines, forgotten = session.lines(session.loss_run)
                seen = forgotten
            else:  # the connection is not lost (yet): nothing is missed
                lines, forgotten, seen = [], 0, 0
            missed, lost = lines[max(0, seen - forgotten):], max(0, forgotten - seen)
        first, size = len(missed), 0
        while first and size + len(missed[first - 1]) <= self.max_backlog // RESUME_SHARE:
            first -= 1
            size += len(missed[first])
        missed, lost = missed[first:], lost + first
        self.take_over(owner, peer)
        self.queue(owner, notice_line('You are back as %s in %s: %s you missed%s' % (
            owner.name, owner.room.shown, plural(len(missed), 'line'),
            ' (about %d more are gone)' % lost if lost else '')))
        self.queue(owner, b''.join(missed))
        self.give_session(owner)  # after what it missed: its client counts from here
        if owner.lost_at is not None and self.link is not None:
            self.link.publish('back', owner.name)
        self.back(owner)
        self.log('%s resumed from %s (%d lines)' % (owner.name, owner.address, len(missed)))

    def take_over(self, owner, newcomer):
        """newcomer's connection becomes owner's: owner keeps its name, room
        and everything else.  A connection owner still had (one the server
        has not yet found dead) is closed, unannounced."""
        if owner.sock is not None:
            self.close(owner)
        if newcomer.key is not None:  # a WebSocket is let in at its handshake
            self.names.pop(newcomer.key, None)
            newcomer.room.remove(newcomer, 'resumed as %s' % owner.name)
            self.end_session(newcomer)
            if self.link is not None:
                self.link.publish('out', newcomer.name, 'resumed as %s' % owner.name)
        if newcomer.events:
            self.selector.unregister(newcomer.sock)
        for field in ('sock', 'address', 'ip', 'inbuf', 'skipping', 'eof', 'websocket',
                      'told_last', 'telnet',
                      'heard', 'heard_at', 'pinged'):
            setattr(owner, field, getattr(newcomer, field))
        owner.outbuf, owner.events = bytearray(), 0
        # What its room said this turn is in what it missed: not again.
        owner.turn, owner.batch_pos = self.turn, len(owner.room.batch)
        owner.lingering = owner.paused = owner.sniffing = False
        owner.authorized = True
        newcomer.sock, newcomer.inbuf, newcomer.close_reason = None, bytearray(), 'resumed'
        peers = self.peers
        peers.discard(newcomer)
        peers.add(owner)
        if self.web is not None and newcomer in self.web.sockets:
            self.web.sockets.discard(newcomer)
            self.web.sockets.add(owner)
        self.set_interest(owner)
        self.unread.add(owner)  # TLS may hold more
        self.call_later(0, self.handle_input, owner)  # lines that came with the /resume

    @command('/pass PASSWORD', 'enter a room that has a password', who=AT_THE_DOOR)
    def cmd_pass(self, peer, secret):
        if peer.authorized:
            self.queue(peer, error_line('you are already in'))
        else:
            self.gate.try_password(peer, secret)

    @command('/op PASSWORD', 'become an operator')
    def cmd_op(self, peer, secret):
        if self.gate.op_password is None:
            self.queue(peer, error_line('this server has no operators'))
        elif peer.operator:
            self.queue(peer, error_line('you are already an operator'))
        elif same_secret(secret, self.gate.op_password):
            peer.operator = True
            self.log('%s is now an operator' % peer.name)
            peer.room.broadcast(notice_line('%s is now an operator' % peer.name))
            if self.link is not None:
                self.link.publish('op', peer.name)
        else:
            self.gate.strike(peer, 'wrong operator password')

    @command('/kick NAME [REASON]', "close NAME's connection", who=OPERATORS, console=True)
    def cmd_kick(self, peer, argument):
        name, _, reason = argument.partition(' ')
        if not name:
            self.usage(peer, self.cmd_kick)
            return
        target = self.names.get(name_key(name))
        if target is None:
            self.queue(peer, error_line('no one called %s is online' % name))
            return
        why = 'kicked by %s%s' % (peer.name, ': ' + reason.strip() if reason.strip() else '')
        self.log('%s was %s' % (target.name, why))
        self.queue(target, error_line('you were ' + why))
        self.drop(target, why, linger=True)  # everyone sees it leave, and why

    @command('/ban NAME|ADDRESS [MINUTES]', 'refuse someone, or an address', who=OPERATORS,
             console=True)
    def cmd_ban(self, peer, argument):
        """Until MINUTES have passed or the server restarts.  An address (or a
        CIDR network) is banned as typed, but a single IPv6 address bans its
        /64 (a host picks any address in it).  A person is banned by their
        address, unless that is a loopback one, which everyone on the
        machine shares: then their name and this connection are."""
        words = argument.split()
        if not 1 <= len(words) <= 2 or not all(NUMBER.match(w) for w in words[1:]):
            self.usage(peer, self.cmd_ban)
            return
        minutes = int(words[1]) if len(words) == 2 else None
        if minutes == 0:
            self.queue(peer, error_line('a ban lasts at least 1 minute (none: until restart)'))
            return
        seconds = None if minutes is None else 60 * minutes
        how_long = ('for ' + plural(minutes, 'minute') if minutes
                    else endless_ban(self.link is not None))
        network = banned_network(words[0])  # an address is an address, never a name
        target = None if network else self.names.get(name_key(words[0]))
        if network is None and target is None:
            self.queue(peer, error_line('%s is neither online nor an address' % words[0]))
            return
        if target is not None and target.ip.is_loopback:  # others there stay
            what = '%s banned %s by name (a shared address) %s' % (
                peer.name, target.name, how_long)
        elif target is not None:
            network = host_of(target.ip)
            what = '%s banned %s (%s) %s' % (peer.name, target.name, network, how_long)
        else:
            what = '%s banned %s %s' % (peer.name, words[0], how_long)
        self.log(what)
        self.wall(notice_line(what))
        if network is None:
            self.gate.ban_person(target, seconds, peer.name)
            what, shown = 'name', target.name
        else:
            what = network
            shown = words[0] if target is None else str(network)
            self.gate.ban(network, shown, seconds, peer.name)
        if self.link is not None:  # every server refuses it, now and later
            self.link.ban(str(what), seconds, peer.name, shown)

    @command('/unban NAME|ADDRESS', 'lift a ban', who=OPERATORS, console=True)
    def cmd_unban(self, peer, argument):
        shown = self.gate.lift(argument)
        if shown is None:
            self.queue(peer, error_line('%s is not banned (see /bans)' % argument))
            return
        self.log('%s lifted the ban on %s' % (peer.name, shown))
        self.queue(peer, notice_line('%s is no longer banned' % shown))
        if self.link is not None:  # on every server
            self.link.unban(argument)

    @command('/bans', 'list the bans', who=OPERATORS, console=True)
    def cmd_bans(self, peer, argument):
        self.gate.expire_bans()
        bans = ['%s (%s)' % (ban.shown, ban.left_text()) for ban in sorted(
            list(self.gate.bans.values()) + list(self.gate.name_bans.values()),
            key=lambda ban: ban.shown)]
        self.queue(peer, notice_line('bans: %s' % (', '.join(bans) or 'none')))

    @command('/mute NAME', 'stop NAME speaking in public', who=OPERATORS, console=True)
    def cmd_mute(self, peer, name):
        other = self.someone(peer, name, self.cmd_mute)
        if other is not None:
            other.muted = peer.name
            self.note_session(other)  # linked: a resume elsewhere does not lift it
            self.log('%s muted %s' % (peer.name, other.name))
            self.queue(other, error_line('you are muted by %s: only private messages to '
                                         'operators go out' % peer.name))
            self.queue(peer, notice_line('%s is muted' % other.name))

    @command('/unmute NAME', 'let NAME speak again', who=OPERATORS, console=True)
    def cmd_unmute(self, peer, name):
        other = self.someone(peer, name, self.cmd_unmute)
        if other is not None:
            other.muted = None
            self.note_session(other)
            self.log('%s unmuted %s' % (peer.name, other.name))
            self.queue(other, notice_line('%s lets you speak again' % peer.name))
            self.queue(peer, notice_line('%s may speak again' % other.name))

    @command('/rename NAME NEWNAME', 'give NAME another name', who=OPERATORS, console=True)
    def cmd_rename(self, peer, argument):
        words = argument.split()
        other = self.someone(peer, words[0] if len(words) == 2 else '', self.cmd_rename)
        if other is not None:
            problem = self.rename(other, unicodedata.normalize('NFC', words[1]), by=peer.name)
            if problem is not None:
                self.queue(peer, error_line('cannot rename %s %s: %s' % (
                    other.name, words[1], problem)))

    @command('/wall TEXT', 'a notice to every room', who=OPERATORS, console=True)
    def cmd_wall(self, peer, text):
        if not text:
            self.usage(peer, self.cmd_wall)
            return
        self.log('%s to everyone: %s' % (peer.name, text))
        self.wall(notice_line('%s to everyone: %s' % (peer.name, text)))

    def someone(self, peer, name, handler):
        """The peer called name, or None (and peer told why)."""
        other = self.names.get(name_key(name)) if name else None
        if not name:
            self.usage(peer, handler)
        elif other is None:
            self.queue(peer, error_line('no one called %s is online' % name))
        return other


# The commands' names, which the terminal client completes with Tab.
COMMAND_WORDS = sorted(name[len('cmd_'):] for name in vars(Commands) if name.startswith('cmd_'))


class Server(Commands):
    """The chat server: one selector over the listening sockets and every
    peer, the timers, and the end-of-turn output.

    Handlers never write to sockets: they queue output, and end_turn() gives
    each peer everything queued for it in one send() per loop turn.  A peer
    leaves its room only at the end of a turn (reap), never in the middle of
    a broadcast; a broken socket is closed at once.
    """

    def __init__(self, listeners, log=None, history=DEFAULT_HISTORY,
                 max_line=MAX_LINE_BYTES, max_backlog=MAX_BACKLOG_BYTES,
                 rate=RATE_LINES_PER_SEC, burst=RATE_BURST_LINES,
                 max_clients=None, selector_class=selectors.DefaultSelector,
                 tls=None, password=None, op_password=None, allow=(), deny=(),
                 max_per_address=MAX_PER_ADDRESS, console=False, motd=(), settings=None,
                 web=True, web_origins=(), metrics=False, data=None,
                 resume_for=DEFAULT_RESUME_FOR, link=None):
        self.listeners = listeners
        self.log = log or (lambda message: None)
        self.history = history
        self.max_line = max_line
        self.max_backlog = max_backlog
        self.rate = rate
        self.burst = burst
        self.gate = Gate(self, tls, password, op_password, allow, deny, max_per_address,
                         max_clients)
        self.selector = selector_class()
        self.peers = set()          # open connections, closing ones aside
        self.closing = set()        # connections finishing their output
        self.names = {}             # name_key -> Peer, for every peer let in
        self.turn = 0
        self.turn_budget = max(1, max_backlog // TURN_SHARE)
        self.behind_bytes = max_backlog // BEHIND_SHARE
        self.rooms = {}             # name_key -> Room; a room is made on first join
        self.kept_rooms = {}        # name_key -> Room: those no one is in (keep_empty)
        self.data = data            # DataLog (--data), or None: history in memory only
        self.resume_for = resume_for  # seconds a lost connection may come back (0: never)
        self.sessions = {}          # SHA-256 of a resume token (token_digest) -> Peer
        self.accounts = {}          # name_key -> (name, password hash): /register
        self.mail = {}              # name_key -> [(stamp, sender, text)] waiting for it
        self.worker = Worker(self)  # password hashes, off the loop
        self.stamp_second, self.stamp_bytes = None, b''
        self.lobby = self.room_named(LOBBY)
        self.busy_rooms = []        # rooms with lines broadcast this turn
        self.motd = list(motd)      # the message of the day, lines of text
        self.settings = settings    # reads the MOTD and password files again (SIGHUP)
        self.reload_wanted = False
        self.web = Web(self, web_origins, metrics) if web else None  # or HTTP is refused
        # What --metrics tells: bytes, lines, peers cut, refusals, and loop turns.
        self.bytes_in = self.bytes_out = self.lines_in = self.lines_out = self.cut_slow = 0
        self.refusals = collections.Counter()  # reason -> connections refused
        self.turn_seconds = self.turn_max = 0.0
        self.direct_bytes = 0       # output for one peer queued this turn (replies, /msg)
        self.dirty = set()          # peers to flush at the end of this turn
        self.held = collections.deque()  # peers with lines held over to next turn
        self.unread = set()         # TLS peers with decrypted input left to read
        self.doomed = []            # peers leaving at the end of this turn
        self.timers = []            # heap of (when, seq, callback, argument)
        self.timer_seq = itertools.count()
        self.guest_numbers = itertools.count(1)  # never reused
        self.link = link            # Link (--redis), or None: this server alone
        if data is not None:
            data.load(self)
            opened = data.people.load(self)
            if resume_for:
                self.restore_sessions(opened)
            self.keep_empty_rooms()
        self.fds_exhausted = False
        self.accepting = False      # the listeners are in the selector
        self.stopping = False
        # stop() may be called from a signal handler or another thread; a byte
        # on this socket pair wakes select() so the loop notices.
        self.wake_r, self.wake_w = socket.socketpair()
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, 'wake')
        for listener in listeners:
            listener.setblocking(False)
        self.resume_accepting()
        if link is not None:
            link.start(self)
        # The server's own terminal takes operator commands, as "server".
        self.console = None
        if console:
            self.console = Peer(None, 'console', burst)
            self.console.name, self.console.operator = SERVER_NAME, True
            self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, 'console')

    # The loop ----------------------------------------------------------------

    def serve_forever(self):
        """Run until stop() is called, then say goodbye to everyone."""
        try:
            while not self.stopping:
                self.run_once()
            self.say_goodbye()
        finally:
            self.close_all()

    def run_once(self, timeout=None):
        """One loop turn: wait for events, handle them, send what they queued."""
        events = self.selector.select(self.next_timeout(timeout))
        started = time.monotonic()
        if self.reload_wanted:
            self.reload()
        self.continue_held()  # first come, first served: held input before new
        # Rotate the order so that when turn_budget cuts a turn short, it is
        # not the same peers that wait every time.
        if events:
            start = self.turn % len(events)
            events = events[start:] + events[:start]
        for key, mask in events:
            peer = key.data
            if peer == 'accept':
                self.accept(key.fileobj)
            elif peer == 'wake':
                drain(self.wake_r)
                self.worker.finish()
            elif peer == 'console':
                self.guarded(self.on_console, self.console)
            elif isinstance(peer, RedisConnection):
                self.link.on_event(peer, mask)
            elif peer.sock is not None:  # not closed earlier this turn
                self.guarded(self.on_event, peer, mask)
        unread, self.unread = self.unread, set()
        for peer in unread:
            if peer.sock is not None and not peer.paused:
                self.guarded(self.on_readable, peer)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback, peer = heapq.heappop(self.timers)
            self.guarded(callback, peer)
        self.end_turn()
        took = time.monotonic() - started
        self.turn_seconds += took
        self.turn_max = max(self.turn_max, took)

    def guarded(self, handler, peer, *args):
        """Run a handler for one peer; a bug it trips over closes that peer,
        not the server."""
        try:
            handler(peer, *args)
        except Exception as exc:
            if not isinstance(peer, Peer):
                raise
            self.log('internal error with %s: %r' % (peer.name or peer.address, exc))
            self.lose(peer, 'server error')

    def on_event(self, peer, mask):
        if peer.handshaking:
            self.gate.shake_hands(peer)
            return
        if mask & selectors.EVENT_READ:
            self.on_readable(peer)
        if mask & selectors.EVENT_WRITE:
            self.dirty.add(peer)

    def next_timeout(self, limit=None):
        """Seconds select() may wait: none while output is queued or held
        input may go on, else until the next timer (or limit)."""
        if self.busy_rooms or self.dirty or self.doomed or self.unread or any(
                not self.must_wait(peer) for peer in self.held):
            return 0
        timeout = limit
        if self.timers:
            due = max(0.0, self.timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def stop(self):
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self.stopping = True
        self.wake()

    def request_reload(self):
        """Ask the loop to read the MOTD and password files again (SIGHUP);
        safe from signal handlers."""
        self.reload_wanted = True
        self.wake()

    def wake(self):
        try:
            self.wake_w.send(b'\0')
        except OSError:
            pass  # the buffer is full (so select() is awake) or it is closed

    def reload(self):
        """Read the MOTD and password files again, no one dropped.  A file
        that cannot be read now keeps what was read before."""
        self.reload_wanted = False
        if self.settings is None:
            return
        try:
            self.motd, self.gate.password, self.gate.op_password = self.settings()
        except UserError as exc:
            self.log('reload failed, keeping the old settings: %s' % exc)
            return
        self.log('reloaded: the MOTD (%s) and the password files'
                 % plural(len(self.motd), 'line'))

    def stamp(self):
        """Now, as utc_stamp(), formatted once a second."""
        now = int(time.time())
        if now != self.stamp_second:
            self.stamp_second, self.stamp_bytes = now, utc_stamp(now)
        return self.stamp_bytes

    def call_later(self, delay, callback, peer=None):
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq),
                                     callback, peer))

    def set_interest(self, peer):
        """The one place that tells the selector what to watch a peer for."""
        wanted = peer.wanted_events()
        if wanted == peer.events:
            return
        if not wanted:
            self.selector.unregister(peer.sock)
        elif not peer.events:
            self.selector.register(peer.sock, wanted, peer)
        else:
            self.selector.modify(peer.sock, wanted, peer)
        peer.events = wanted

    # Connections ---------------------------------------------------------------

    def accept(self, listener):
        """Accept a bounded number of waiting connections."""
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                self.fds_exhausted = False  # no one waits: the episode is over
                return
            except OSError as exc:
                if exc.errno in FDS_EXHAUSTED:
                    self.pause_accepting(exc)
                    return
                continue  # ECONNABORTED and the like: that one is gone
            try:
                self.gate.admit(sock, address)
            except Exception as exc:  # a socket reset before it was set up, say
                self.log('internal error admitting %s: %r' % (printable_address(address), exc))
                sock.close()

    def pause_accepting(self, exc):
        """Out of file descriptors: stop accepting for a moment instead of
        spinning on a listener that stays readable.  Log once per episode."""
        if not self.fds_exhausted:
            self.log('out of file descriptors (%s): pausing new connections' % exc.strerror)
            self.fds_exhausted = True
        if self.accepting:  # both listeners may run out in one turn
            self.stop_accepting()
            self.call_later(ACCEPT_PAUSE_SEC, self.resume_accepting)

    def stop_accepting(self):
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.selector.unregister(listener)

    def resume_accepting(self, _=None):
        if not self.accepting and not self.stopping:
            self.accepting = True
            for listener in self.listeners:
                self.selector.register(listener, selectors.EVENT_READ, 'accept')

    def let_in(self, peer):
        """peer has passed the gate: give it a guest name, welcome it into
        the lobby and tell the others."""
        name = self.guest_name()
        peer.name, peer.key, peer.claimed = name, name_key(name), time.time()
        self.names[peer.key] = peer
        self.log('%s joined from %s' % (name, peer.address))
        self.queue(peer, notice_line(WELCOME_TEXT % name))
        if self.max_line != MAX_LINE_BYTES:  # so a client refuses longer ones as typed
            self.queue(peer, notice_line(LINE_LIMIT_TEXT % self.max_line))
        self.queue(peer, b''.join(notice_line(line) for line in self.motd))
        self.join(peer, self.lobby)
        self.give_session(peer)

    def guest_name(self):
        """guest-N, N never used before (linked: numbers from Redis, for the
        whole chat, while it can be reached)."""
        while True:
            number = self.link.guest_number() if self.link is not None else None
            name = GUEST_PREFIX + str(next(self.guest_numbers) if number is None else number)
            if name_key(name) not in self.names:
                return name

    # Sessions that resume ----------------------------------------------------------

    def give_session(self, peer):
        """A new resume token for peer (the old one, if any, no longer
        works); what it is sent after the notice is counted."""
        if not self.resume_for:
            return
        self.end_session(peer)
        session = Session(peer)  # from the room's lines said so far
        if self.link is not None:
            session.bus_mark = session.private_mark = self.link.position()
            session.apart = not self.link.up
        self.queue(peer, notice_line(RESUME_NOTICE % session.token))
        peer.session = session   # counts what comes after the notice
        self.sessions[session.digest] = peer
        self.note_session(peer)

    def note_session(self, peer):
        """With --data, keep on disk who holds peer's session, in which room,
        and where that room's log stood: after a restart the session waits
        for its client (restore_sessions), which is sent what it missed.  At
        every new token, room and name."""
        if self.data is not None and peer.session is not None:
            stamp, count = peer.room.history.position()
            self.data.people.note('session', peer.session.digest, peer.name, peer.room.shown,
                                  str(peer.ip), stamp.decode(), str(count))
        if self.link is not None and peer.session is not None:
            self.link.note_session(peer)

    def end_session(self, peer, on_disk=True):
        """peer's token no longer works (here; and on disk, unless told not to)."""
        if peer.session is not None:
            self.sessions.pop(peer.session.digest, None)
            if self.data is not None and on_disk:
                self.data.people.note('ended', peer.session.digest)
            if self.link is not None and on_disk:
                self.link.end_session(peer.session.digest)
            peer.session = None

    def restore_sessions(self, opened):
        """After a restart (--data): each session that was open waits for its
        client for --resume-for, as a lost connection does, with its name
        and its room, which had no notice of it."""
        restored = 0
        for digest, (name, room_name, ip, stamp, count) in opened.items():
            key = name_key(name)
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if key in self.names or name_problem(name) or name_problem(room_name[1:]):
                continue
            peer = Peer(None, '%s (before the restart)' % ip, self.burst, ip)
            peer.name, peer.key, peer.claimed = name, key, time.time()
            room = peer.room = self.room_named(room_name[1:])
            room.members[key], room.roster = peer, None
            self.names[key] = peer
            peer.session = Session(peer, digest)
            peer.session.mark_loss()
            peer.session.restored = ((stamp.encode(), int(count)), room.history.position())
            peer.lost_at = time.monotonic()
            self.sessions[digest] = peer
            self.call_later(self.resume_for, self.expire_session, peer)
            restored += 1
        if restored:
            self.log('data: %s for %s' % (
                '1 session waits for its client' if restored == 1 else
                '%d sessions wait for their clients' % restored, duration(self.resume_for)))

    def lost(self, peer):
        """peer's connection is gone but it may come back: its name and room
        wait for it, and what is said meanwhile is kept (Session)."""
        peer.lost_at = time.monotonic()
        if peer.behind_since is not None:  # its backlog went with the connection
            peer.behind_since = None
            peer.room.note_behind(peer)
        peer.session.mark_loss()
        self.log('%s lost the connection (%s); it may resume within %s' % (
            peer.name, peer.close_reason, duration(self.resume_for)))
        peer.room.departures.append((peer.name, LOST_NOTE))  # told with other leaves
        peer.room.announce_soon()
        peer.close_reason = None
        if self.link is not None:
            peer.session.lost_mark = self.link.position()
            self.link.note_session(peer)
            self.link.publish('lost', peer.name)
        self.call_later(self.resume_for, self.expire_session, peer)

    def expire_session(self, peer):
        if peer.lost_at is not None and peer.sock is None and (
                time.monotonic() - peer.lost_at >= self.resume_for - 0.01):
            self.drop(peer, 'connection lost')

    def keep_empty(self, room):
        """A room no one is in: forget it, or keep it for its history
        (Room.durable); past the limit, forget the one said in longest ago
        (the first kept, of a tie).  Linked, the limit is Redis's, which
        forgets rooms in that order."""
        if room is self.lobby:
            return  # always here
        if not room.durable():
            if self.rooms.get(room.key) is room:
                del self.rooms[room.key]
            return
        self.kept_rooms[room.key] = room
        self.bound_kept_said()
        most = KEPT_ROOMS_MAX if self.link is None else LINK_ROOMS_MAX
        while len(self.kept_rooms) > most:  # (a scan: only a flood of rooms gets here)
            key = min(self.kept_rooms, key=lambda kept: self.kept_rooms[kept].last_said())
            oldest = self.kept_rooms.pop(key)
            oldest.trim_said(0)  # (sessions that were in it may hold it: not its lines)
            if self.rooms.get(key) is oldest and not oldest.members:
                del self.rooms[key]

    def bound_kept_said(self):
        """What the rooms no one is in said, kept for the sessions that
        were in them (Session.room_lines), stays within KEPT_SAID_SHARE
        backlog caps in all, not SAID_KEEP_SHARE for each of thousands: the
        rooms that emptied first forget theirs first.  (A scan of the kept
        rooms, a few thousand at most, as one empties.)"""
        total = sum(room.said_bytes for room in self.kept_rooms.values())
        for room in self.kept_rooms.values():  # in the order they emptied
            if total <= self.max_backlog * KEPT_SAID_SHARE:
                break
            total -= room.said_bytes
            room.trim_said(0)

    def keep_empty_rooms(self):
        """After the rooms are loaded (--data, --redis): keep those no one is in."""
        for room in [room for room in self.rooms.values() if not room.members]:
            self.keep_empty(room)

    def room_named(self, name):
        """The room called name (without "#"), made if it is new."""
        room = self.rooms.get(name_key(name))
        if room is None:
            room = self.rooms[name_key(name)] = Room(self, name, self.history)
        return room

    def join(self, peer, room):
        """Put peer in room and tell it what a newcomer is told: where it is,
        the topic, who is there and the room's recent lines."""
        if self.link is not None and peer.room is None:  # a name's first room: its claim
            self.link.claim(peer, 'in', peer.name, room.name, peer.claimed)
        elif self.link is not None:
            self.link.publish('in', peer.name, room.name, peer.claimed)
        if peer.room is None:
            room.add(peer)
        else:
            peer.room.catch_up(peer)  # what it was sent there this turn comes first
            if peer.session is not None:
                peer.session.close_run()  # before the room hears it left
            self.move(peer, room)
        if peer.session is not None:
            peer.session.moved(room)
            if self.link is not None:
                peer.session.bus_mark = self.link.position()
        self.queue(peer, notice_line(YOU_ARE_IN % room.shown))
        self.note_session(peer)  # its client counts room lines from that notice
        if room.topic:
            self.queue(peer, notice_line('Topic of %s: %s' % (room.shown, room.topic)))
        self.queue(peer, room.welcome_list())
        replay = room.recent_history(self.turn_budget, peer)
        if replay:
            self.queue(peer, notice_line('Last %s:' % plural(len(replay), 'message')))
            self.queue(peer, b''.join(replay))

    def drop(self, peer, reason, linger=False):
        """Take peer out at the end of this turn; the first reason given is
        the one announced.  With linger, it gets its queued output before
        the connection closes."""
        if peer.close_reason is None:
            peer.close_reason = reason
            peer.lingering = linger
            self.doomed.append(peer)
            if linger and not peer.told_last:  # not even a line said later this turn
                if peer.room is not None:
                    peer.room.catch_up(peer)  # (but those said before, yes)
                if peer.websocket is not None:
                    self.queue_frame(peer, close_frame(1000))  # before the FIN, and last
                peer.told_last = True

    def lose(self, peer, reason):
        """The connection cannot go on: close it now, announce it later."""
        self.drop(peer, reason)
        self.close(peer)

    def reap(self):
        """Take the peers dropped this turn out of their rooms; tell the others."""
        doomed, self.doomed = self.doomed, []
        for peer in doomed:
            if peer.home is not None:
                continue  # it resumed on another server (hand_over) meanwhile
            if (peer.session is not None and peer.close_reason in LOST_REASONS
                    and peer.lost_at is None and not self.stopping):
                if peer.sock is not None:
                    self.close(peer)
                self.lost(peer)
                continue
            if peer.key is not None and self.names.get(peer.key) is peer:
                # Lost as the server stops: it may resume after the restart.
                self.end_session(peer, on_disk=not (self.stopping and
                                                    peer.close_reason in LOST_REASONS))
                peer.lost_at = None
                self.log('%s left (%s)' % (peer.name, peer.close_reason))
                self.forget(peer, peer.close_reason)
                if self.link is not None:
                    self.link.publish('out', peer.name, peer.close_reason)
            if peer.sock is not None:
                if peer.lingering:
                    self.start_closing(peer)
                else:
                    self.close(peer)

    def forget(self, peer, reason):
        """peer, here or on another server, has left the chat."""
        del self.names[peer.key]
        peer.room.remove(peer, reason)
        for other in peer.ignored_by:  # an ignore ends when either leaves
            other.ignoring.discard(peer)
            if other.session is not None and other.room is not None:
                other.session.moved(other.room)
                if self.link is not None:
                    other.session.hears_again(peer, self.link.position())
                    self.note_session(other)
        for other in peer.ignoring:
            other.ignored_by.discard(peer)

    # People on other servers (--redis) -------------------------------------------

    def add_mirror(self, home, name, room_name, claimed):
        """A person on server home, as a Peer without a socket."""
        mirror = Peer(None, 'on another server', 0)
        mirror.home, mirror.name, mirror.key, mirror.claimed = (
            home, name, name_key(name), claimed)
        self.names[mirror.key] = mirror
        self.room_named(room_name if name_problem(room_name) is None else LOBBY).add(mirror)
        return mirror

    def move(self, peer, room):
        """peer, here or on another server, leaves its room for room."""
        self.kept_rooms.pop(room.key, None)  # the old room's emptying must not forget it
        peer.room.remove(peer, 'for ' + room.shown)
        room.add(peer)

    def move_mirror(self, mirror, room_name):
        room = self.room_named(room_name)
        if room is not mirror.room:
            self.move(mirror, room)

    def drop_mirror(self, mirror, reason):
        if self.names.get(mirror.key) is mirror:
            self.forget(mirror, reason)

    def rename_guest(self, peer):
        """A name clash settled against peer: a guest name instead."""
        peer.claimed = time.time()
        self.rename_now(peer, self.guest_name())

    def wall_here(self, line):
        """A notice for every room on this server."""
        for room in list(self.rooms.values()):
            room.broadcast(line)

    def start_closing(self, peer, code=1000):
        """Let peer read what is queued for it, then close (a WebSocket is
        sent a close frame with code first).  Its input is read and thrown
        away meanwhile: closing a socket with unread input sends a reset,
        which can destroy output the peer has not read yet."""
        if peer.websocket is not None and not peer.told_last:
            peer.told_last = True
            peer.outbuf += close_frame(code)
        self.gate.forget(peer)
        self.closing.add(peer)
        peer.lingering = True
        peer.paused = peer.handshaking = False
        del peer.inbuf[:]
        self.set_interest(peer)
        self.dirty.add(peer)
        self.call_later(LINGER_SEC, self.close, peer)

    def close(self, peer):
        """Release a peer's socket and memory now.  Safe to call twice."""
        if peer.sock is None:
            return
        if peer.events:
            self.selector.unregister(peer.sock)
        peer.sock.close()
        peer.sock = None
        peer.events = 0
        peer.inbuf, peer.outbuf = bytearray(), bytearray()
        self.gate.forget(peer)
        if self.web is not None:
            self.web.sockets.discard(peer)
        self.closing.discard(peer)
        self.dirty.discard(peer)

    # Input ---------------------------------------------------------------------

    def must_wait(self, peer):
        """True if peer's lines must wait: this turn has queued a share of
        output (max_backlog / TURN_SHARE) for those they would reach, or a
        member of its room has not read what it was sent (backpressure),
        or (--redis) lines said here wait for Redis to pass them back."""
        room = peer.room
        if room is None:
            return self.direct_bytes >= self.turn_budget
        return (room.batch_bytes + self.direct_bytes >= self.turn_budget
                or (room.behind and room.holding())
                or (self.link is not None and self.link.said_bytes > self.behind_bytes))

    def on_readable(self, peer):
        """Read one chunk from peer and handle the lines it completes."""
        if self.must_wait(peer) and not peer.lingering:
            self.hold(peer)
            return
        try:
            data = peer.sock.recv(READ_CHUNK_BYTES)
        except WOULD_BLOCK:
            return
        except OSError:
            self.lose(peer, 'connection lost')
            return
        if peer.lingering:  # closing: input is only drained
            if not data:
                peer.eof = True
                if not peer.outbuf:
                    self.close(peer)
            return
        if not data:
            peer.eof = True  # what is already here is still handled
            self.set_interest(peer)
        elif self.gate.tls is not None and peer.sock.pending():
            self.unread.add(peer)  # decrypted, but no socket event will say so
        self.bytes_in += len(data)
        if peer.websocket is not None:  # frames in, lines out
            data = self.web.unframe(peer, data)
        elif b'\xff' in data or peer.telnet:  # telnet talks in-band: answer, never say
            data, replies, peer.telnet = strip_telnet(peer.telnet + data)
            if replies:
                self.queue(peer, replies)
        peer.inbuf += data
        if peer.http:  # the rest of a request head
            self.web.on_request(peer)
            return
        if not peer.heard:
            verdict = http_verdict(bytes(peer.inbuf[:32]))
            if verdict is None and not peer.eof:
                return  # "GE": the rest will tell
            peer.heard = True
            if verdict and self.web is not None:
                self.web.take(peer)
                return
            if verdict:
                self.refuse_http(peer)
                return
        self.handle_input(peer)

    def refuse_http(self, peer):
        """An HTTP request on the chat port (a web page can make a browser
        send one to any port): close it unheard.  It never entered the
        room, so no one is told, and its body is no password guess."""
        first = decode(bytes(peer.inbuf[:200]).split(b'\n')[0]).strip()
        self.log('refused %s: an HTTP request (%s)' % (peer.address, first[:60]))
        self.refusals['HTTP'] += 1
        self.lose(peer, 'HTTP request')

    def handle_input(self, peer):
        """Handle the complete lines in peer.inbuf, as many as its flood
        budget and this turn's share allow; the rest wait, and peer is not
        read again until they are handled."""
        allowed = self.lines_allowed(peer)
        handled = self.say_all(peer, allowed)
        waiting = False
        while allowed is None or handled < allowed:
            waiting = self.must_wait(peer)
            raw = None if waiting else peer.next_line(self.max_line)
            if raw is None:
                break
            handled += 1
            if raw is TOO_LONG:
                self.refuse_long_line(peer)
            else:
                self.handle_line(peer, raw)
            if peer.close_reason is not None:
                return
            if peer.paused:  # its private message waits for a reader to catch up
                break
        if allowed is not None:
            peer.tokens -= handled
        if waiting:
            self.hold(peer)
            return
        if peer.trim_unfinished_line(self.max_line):
            self.refuse_long_line(peer)
        if b'\n' in peer.inbuf and not peer.paused:
            if not peer.warned:  # once: a piped client learns how long to wait
                peer.warned = True
                self.queue(peer, notice_line(FLOOD_TEXT % self.rate))
            self.pause(peer, (1 - peer.tokens % 1) / self.rate)
        elif peer.eof and b'\n' not in peer.inbuf:
            self.drop(peer, 'connection closed', linger=True)

    def say_all(self, peer, allowed):
        """The common case, at C speed: when every complete line waiting is
        plain text (no command, no blank or overlong line) and they all fit
        the flood budget and this turn's share, decode, clean, prefix and
        encode them in one go.  How many lines it said (0: none, go line by
        line)."""
        end = peer.inbuf.rfind(b'\n')
        if end < 0 or peer.skipping or not peer.lines or peer.room is None or peer.muted:
            return 0  # a first line, or one before the password, goes line by line
        raw = bytes(peer.inbuf[:end])
        count = raw.count(b'\n') + 1
        if allowed is not None and count > allowed:
            return 0
        if len(raw) > self.max_line and max(map(len, raw.split(b'\n'))) > self.max_line:
            return 0
        text = tidy(raw.decode('utf-8', 'replace'), UNPRINTABLE_BUT_LF)
        if text.startswith('/') or '\n/' in text or has_blank_line(text):
            return 0
        prefix = '<%s> ' % peer.name
        lines = (prefix + text.replace('\n', '\n' + prefix) + '\n').encode()
        room = peer.room
        if room.batch_bytes + self.direct_bytes + len(lines) > self.turn_budget:
            return 0
        del peer.inbuf[:end + 1]
        room.say(peer, lines)
        peer.lines += count
        self.lines_in += count
        peer.active_at = time.monotonic()
        return count

    def refuse_long_line(self, peer):
        self.queue(peer, error_line('line too long (over %d bytes): not sent' % self.max_line))

    def lines_allowed(self, peer):
        """Refill peer's flood budget for the time gone by; how many whole
        lines it may send now (None: no limit)."""
        if not self.rate:
            return None
        now = time.monotonic()
        peer.tokens = min(self.burst, peer.tokens + (now - peer.tokens_at) * self.rate)
        peer.tokens_at = now
        return int(peer.tokens)

    def pause(self, peer, delay):
        """Stop reading peer for delay seconds (until one more line fits its
        flood budget).  Its input waits in the kernel meanwhile, delayed but
        never dropped, and TCP slows the sender down."""
        if not peer.paused:
            peer.paused = True
            self.set_interest(peer)
            self.call_later(delay, self.resume, peer)

    def resume(self, peer):
        if peer.sock is not None and peer.close_reason is None:
            peer.paused = False
            self.set_interest(peer)
            if self.gate.tls is not None and peer.sock.pending():
                self.unread.add(peer)  # TLS kept it while paused; no event will say so
            self.handle_input(peer)

    def hold(self, peer):
        """peer's lines must wait (must_wait): it is not read meanwhile, and
        waits in a queue, so that every held peer gets its turn before
        anyone's new input is read."""
        peer.paused = True
        self.set_interest(peer)
        if not peer.held:
            peer.held = True
            self.held.append(peer)

    def continue_held(self, _=None):
        """Let held peers go on, in order, as far as their rooms allow."""
        for _ in range(len(self.held)):
            peer = self.held.popleft()
            peer.held = False
            if self.must_wait(peer):
                self.hold(peer)  # to the back of the queue, in the same order
            else:
                self.guarded(self.resume, peer)  # back of the queue if held again

    def handle_line(self, peer, raw):
        """One line from peer: a command, or a public message."""
        if peer.sniffing and not raw.startswith(b'/resume '):
            self.gate.open_door(peer)  # it spoke first (a resume may be let in as before)
        text = tidy(raw.decode('utf-8', 'replace'))
        peer.lines += 1
        self.lines_in += 1
        peer.active_at = time.monotonic()
        if has_blank_line(text):
            return  # empty lines, and lines of nothing but invisible characters
        if text.startswith('/') and not text.startswith('//'):
            word, _, argument = text[1:].partition(' ')
            self.run_command(peer, word, argument.strip())
        elif not peer.authorized:
            self.queue(peer, error_line('send /pass PASSWORD first'))
        elif peer is self.console:
            self.wall(notice_line('server: %s' % text))
        elif not self.refused_if_muted(peer):
            peer.room.say(peer, public_line(peer.name, text[1:] if text.startswith('//')
                                            else text))

    def on_console(self, console):
        """Lines typed at the server's terminal: commands run as an operator
        called "server"; other text is announced to everyone."""
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:  # EIO: the server was put in the background
            data = b''
        if not data:
            self.log('the console is closed')
            self.selector.unregister(sys.stdin.fileno())
            return
        self.console.inbuf += data
        while True:
            raw = self.console.next_line(self.max_line)
            if raw is None:
                break
            if raw is not TOO_LONG:
                self.handle_line(self.console, raw)

    # Output --------------------------------------------------------------------

    def wall(self, line):
        """A notice for every room (linked: on every server)."""
        if self.link is None or not self.link.publish_numbered(
                'wall', lambda: self.wall_here(line), line.decode().rstrip('\n')):
            self.wall_here(line)

    def queue(self, peer, data):
        """Queue data for one peer, after the lines of its room it has not
        yet been given, so that everything reaches it in the order it
        happened."""
        if peer is self.console:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return
        if peer.home is not None:  # on another server: an answer to a command run here
            if self.link is not None:
                self.link.publish('to', peer.name, data)
            return
        if peer.sock is None:  # lost: kept for its return, if it may come back
            if peer.session is not None and peer.lost_at is not None:
                peer.session.direct(data)
            return
        if peer.told_last:
            return  # its last words are queued (RFC 6455: no data after a close frame)
        if peer.room is not None:
            peer.room.catch_up(peer)
        if peer.session is not None and data.endswith(b'\n'):
            peer.session.direct(data)
        peer.outbuf += data if peer.websocket is None else text_frames(data)
        self.direct_bytes += len(data)  # it counts against this turn's share
        self.dirty.add(peer)

    def queue_frame(self, peer, frame):
        """Queue a WebSocket control frame (ping, pong, close) for peer, in
        order with its lines."""
        if peer.room is not None:
            peer.room.catch_up(peer)
        peer.outbuf += frame
        self.dirty.add(peer)

    def end_turn(self):
        """Write the turn's records to the data log, then send each peer
        what this turn queued for it, in one send() each, then take the
        peers dropped this turn out of their rooms."""
        if self.data is not None:
            self.data.write(self)  # write-ahead: nobody sees a line that is not written
        if self.link is not None:
            self.link.flush()
        busy, self.busy_rooms = self.busy_rooms, []
        for room in busy:
            room.deliver()
        self.direct_bytes = 0
        self.turn += 1
        dirty, self.dirty = self.dirty, set()
        for peer in dirty:
            if peer.sock is not None:
                self.flush(peer)
        self.reap()

    def send_fresh(self, peer, data):
        """Send data to a peer with nothing queued: the common case, which
        copies nothing unless the socket takes only part of it."""
        try:
            sent = send_some(peer.sock, data)
        except OSError:
            self.lose(peer, 'connection lost')
            return
        self.bytes_out += sent
        if sent < len(data):
            peer.outbuf += memoryview(data)[sent:]
            self.judge(peer)

    def flush(self, peer):
        """Try once to send peer's outbuf; keep the unsent tail."""
        try:
            sent = send_some(peer.sock, peer.outbuf)
        except OSError:
            self.lose(peer, 'connection lost')
            return
        self.bytes_out += sent
        del peer.outbuf[:sent]
        if peer.lingering and not peer.outbuf:
            self.finish_closing(peer)
        else:
            self.judge(peer)

    def judge(self, peer):
        """After a send, a peer whose backlog is still over the cap is too
        slow: it goes, and its memory with it; no one else waits for it."""
        if len(peer.outbuf) > self.max_backlog and not peer.lingering:
            self.log('%s is too slow: %d bytes unsent' % (peer.name, len(peer.outbuf)))
            self.cut_slow += 1
            self.lose(peer, 'too slow')
            return
        self.set_interest(peer)
        behind = len(peer.outbuf) > self.behind_bytes
        if behind != (peer.behind_since is not None):  # it fell behind, or caught up
            peer.behind_since = time.monotonic() if behind else None
            if peer.room is not None:
                peer.room.note_behind(peer)
            if behind:  # the loop must look again when its grace is over
                self.call_later(BEHIND_GRACE_SEC, self.continue_held)

    def finish_closing(self, peer):
        """Everything is sent to a closing peer: say so (TLS's close_notify,
        then a FIN), and close once it has closed its side too (or
        LINGER_SEC has passed).  Without close_notify, openssl s_client and
        ncat --ssl report a truncated session."""
        if ssl is not None and isinstance(peer.sock, ssl.SSLSocket):
            try:
                peer.sock.unwrap()  # sends close_notify; its answer is not awaited
            except (OSError, ValueError):
                pass
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if peer.eof:
            self.close(peer)
        else:
            self.set_interest(peer)

    # Shutdown ------------------------------------------------------------------

    def say_goodbye(self):
        """Tell every peer the server is going, and flush for about a second."""
        self.log('shutting down')
        self.stop_accepting()
        for peer in list(self.peers):
            if peer.name is not None:
                self.queue(peer, notice_line('server shutting down'))
            self.start_closing(peer, code=1001)  # WebSocket's "going away"
        deadline = time.monotonic() + SHUTDOWN_FLUSH_SEC
        while self.closing and time.monotonic() < deadline:
            self.run_once(timeout=deadline - time.monotonic())

    def close_all(self):
        for peer in list(self.peers | self.closing):
            self.close(peer)
        if self.link is not None:
            self.link.close()
        if self.data is not None:
            self.data.close()
        for sock in self.listeners + [self.wake_r, self.wake_w]:
            sock.close()
        self.selector.close()


class Web:
    """The chat port's web side, in the same loop.  A connection whose first
    bytes are an HTTP request gets the page (GET /), becomes a WebSocket
    (GET /ws), or gets a short error, and nothing of it reaches a room.  A
    WebSocket is then a peer like any other: its text frames are its lines,
    flood control, caps, bans and the password apply unchanged, and its
    lines go out as text frames, framed once per room and turn (Room.deliver)."""

    def __init__(self, server, origins=(), metrics=False):
        self.server = server
        self.origins = list(origins)  # other origins whose pages may open /ws
        self.metrics = metrics        # serve GET /metrics
        # The page refuses a line over the server's limit before sending it.
        page = PAGE.replace('const MAX_LINE_BYTES = 4096;',
                            'const MAX_LINE_BYTES = %d;' % server.max_line)
        self.page = page.encode('utf-8')
        self.hashes = tuple(csp_hash(re.search('<%s>(.*?)</%s>' % (tag, tag), page,
                                               re.DOTALL).group(1))
                            for tag in ('script', 'style'))
        self.sockets = set()          # WebSocket peers, pinged when idle
        self.pinging = False          # a timer will look at them

    # The request --------------------------------------------------------------

    def take(self, peer):
        """peer spoke HTTP: read its request head (at most 8 KiB, within
        HTTP_HEAD_SEC, as a TLS handshake) instead of lines."""
        peer.http, peer.sniffing = True, False
        self.server.call_later(HTTP_HEAD_SEC, self.expire_request, peer)
        self.on_request(peer)

    def expire_request(self, peer):
        if peer.http and peer.sock is not None and peer.close_reason is None:
            self.server.log('dropped %s: no HTTP request in %d s' % (peer.address, HTTP_HEAD_SEC))
            self.server.lose(peer, 'no HTTP request')

    def on_request(self, peer):
        """Answer the request head in peer.inbuf once it is complete."""
        request = read_request_head(peer.inbuf)
        if request is None:
            if peer.eof:
                self.server.lose(peer, 'half an HTTP request')
            return
        if isinstance(request, HttpError):
            self.answer(peer, request.response(), '%d %s' % (request.status, request.reason))
            return
        rest = bytes(peer.inbuf[request.head_length:])
        del peer.inbuf[:]
        head_only = request.method == 'HEAD'
        if request.path == '/ws':
            self.upgrade(peer, request, rest)
        elif request.path == '/metrics' and self.metrics and request.method in ('GET', 'HEAD'):
            self.answer(peer, http_response(200, 'OK', self.metrics_text().encode(),
                                            'text/plain; version=0.0.4; charset=utf-8',
                                            head_only=head_only), '200 /metrics')
        elif request.path not in ('/', '/index.html'):
            self.answer(peer, HttpError(404, 'Not Found').response(head_only), '404 %s' % (
                request.path[:60]))
        elif request.method not in ('GET', 'HEAD'):
            self.answer(peer, HttpError(405, 'Method Not Allowed', [('Allow', 'GET, HEAD')])
                        .response(), '405 %s' % request.method)
        else:
            csp = page_csp(request.headers.get('host', 'localhost'), self.scheme(), *self.hashes)
            self.answer(peer, http_response(200, 'OK', self.page, 'text/html; charset=utf-8',
                                            csp=csp, head_only=head_only), '200 the page')

    def scheme(self):
        return 'https' if self.server.gate.tls else 'http'

    def answer(self, peer, response, what):
        """Send an HTTP response and close: the connection is done."""
        self.server.log('%s %s: %s' % (peer.address, 'HTTP', what))
        peer.http = False
        peer.outbuf += response
        self.server.dirty.add(peer)
        self.server.drop(peer, 'HTTP %s' % what.split(' ')[0], linger=True)

    def upgrade(self, peer, request, rest):
        """GET /ws: a WebSocket, if the handshake is right and the page that
        asks is this server's own (or --web-origin's): a page elsewhere must
        not open a socket in its visitor's name (cross-site hijacking)."""
        problem = websocket_problem(request)
        if problem is None and not origin_allowed(request, self.scheme(), self.origins):
            problem = HttpError(403, 'Forbidden: WebSockets from %s are not allowed here'
                                % request.headers.get('origin', '')[:80].replace('\r', ''))
        if problem is not None:
            self.answer(peer, problem.response(), '%d %s' % (problem.status, problem.reason))
            return
        peer.http = False
        peer.websocket = WebSocketReader(self.server.max_line)
        peer.outbuf += websocket_response(request)
        self.server.dirty.add(peer)
        self.sockets.add(peer)
        if not self.pinging:
            self.pinging = True
            self.server.call_later(WS_PING_SEC / 4, self.ping_idle)
        self.server.gate.greet(peer)
        peer.inbuf += self.unframe(peer, rest)
        self.server.handle_input(peer)

    # Frames -------------------------------------------------------------------

    def unframe(self, peer, data):
        """The lines in the frames that data completes (each text message a
        line); control frames are answered here."""
        peer.heard_at, peer.pinged = time.monotonic(), None
        lines = []
        for event in peer.websocket.feed(data):
            kind = event[0]
            if kind == 'lines':
                lines.append(event[1])
            elif kind == 'text':
                lines.append(event[1].encode('utf-8') + b'\n')
            elif kind == 'ping':
                self.server.queue_frame(peer, encode_frame(OP_PONG, event[1]))
            elif kind in ('close', 'fail'):
                code = event[1]
                self.server.queue_frame(peer, close_frame(code, event[2] if kind == 'fail'
                                                          else ''))
                peer.told_last = True  # the answer, echoing its code, is the last frame
                if kind == 'fail':
                    self.server.log('WebSocket %s broke the protocol: %s' % (
                        peer.name or peer.address, event[2]))
                self.server.drop(peer, 'connection closed' if kind == 'close'
                                 else 'WebSocket error: %s' % event[2], linger=True)
        return b''.join(lines)

    def ping_idle(self, _=None):
        """Every WS_PING_SEC / 4: ping a WebSocket idle for WS_PING_SEC; drop
        one that has not answered a ping within half of it.  A phone that
        walked out of Wi-Fi sends no FIN: it leaves within a minute.  Only a
        ping unanswered drops a peer, however late this runs."""
        now = time.monotonic()
        for peer in list(self.sockets):
            if peer.sock is None or peer.close_reason is not None:
                continue
            if peer.pinged is not None and now - peer.pinged >= WS_PING_SEC / 2:
                self.server.log('%s did not answer a ping' % (peer.name or peer.address))
                self.server.lose(peer, 'no answer to ping')
            elif peer.pinged is None and now - peer.heard_at >= WS_PING_SEC:
                peer.pinged = now
                self.server.queue_frame(peer, encode_frame(OP_PING, b''))
        self.pinging = bool(self.sockets)
        if self.pinging:
            self.server.call_later(WS_PING_SEC / 4, self.ping_idle)

    def metrics_text(self):
        """The server's counters in Prometheus's text format."""
        server = self.server
        figures = [
            ('chat_peers', 'gauge', len(server.names), 'people in rooms'),
            ('chat_connections', 'gauge', len(server.peers), 'open connections'),
            ('chat_websockets', 'gauge', len(self.sockets), 'WebSocket connections'),
            ('chat_rooms', 'gauge', len(server.rooms), 'rooms'),
            ('chat_lines_in_total', 'counter', server.lines_in, 'lines received'),
            ('chat_lines_out_total', 'counter', server.lines_out,
             'room lines delivered, one per recipient'),
            ('chat_bytes_in_total', 'counter', server.bytes_in, 'bytes received'),
            ('chat_bytes_out_total', 'counter', server.bytes_out, 'bytes sent'),
            ('chat_slow_peers_cut_total', 'counter', server.cut_slow,
             'peers cut off as too slow'),
            ('chat_loop_turns_total', 'counter', server.turn, 'loop turns'),
            ('chat_loop_turn_seconds_total', 'counter', round(server.turn_seconds, 6),
             'time spent in loop turns'),
            ('chat_loop_turn_seconds_max', 'gauge', round(server.turn_max, 6),
             'the longest loop turn')]
        if server.link is not None:
            figures += [('chat_link_up', 'gauge', int(server.link.up),
                         '1 while linked through Redis to the other servers'),
                        ('chat_link_servers', 'gauge', len(server.link.heard),
                         'the other servers known: heard lately, or gone with people '
                         'who may resume')]
        lines = []
        for name, kind, value, what in figures:
            lines += ['# HELP %s %s' % (name, what), '# TYPE %s %s' % (name, kind),
                      '%s %s' % (name, value)]
        lines += ['# HELP chat_refused_total connections refused, by reason',
                  '# TYPE chat_refused_total counter']
        lines += ['chat_refused_total{reason="%s"} %d' % (reason, count)
                  for reason, count in sorted(server.refusals.items())]
        return '\n'.join(lines) + '\n'

def drain(sock):
    """Read and discard whatever is waiting on a nonblocking socket."""
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def default_max_clients():
    """As many clients as the open-files limit leaves room for."""
    if resource is None:
        return 500  # Windows: select() handles at most 512 sockets
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - RESERVED_FDS)


def raise_open_files_limit():
    """Raise the soft open-files limit to the hard limit: one per peer."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # Linux's default fs.nr_open
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit we have


def open_listeners(host, port):
    """Listen on host:port: on every address host names, or, with no host,
    on all interfaces over IPv4 and IPv6 (one dual-stack socket if the
    OS allows).  With port 0 every socket shares the first one's port."""
    if host is None:
        plans = [(socket.AF_INET6, ('::', port)), (socket.AF_INET, ('0.0.0.0', port))]
    else:
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise UserError('cannot listen on %s: %s' % (host, exc.strerror))
        plans = []
        for family, _, _, _, address in infos:
            if (family, address[:2]) not in ((f, a[:2]) for f, a in plans):
                plans.append((family, address))
    listeners = []
    for family, address in plans:
        if listeners and family == socket.AF_INET and host is None and dual_stack(listeners[0]):
            break  # the IPv6 socket already takes IPv4 connections
        if listeners and address[1] == 0:
            address = (address[0], listeners[0].getsockname()[1]) + tuple(address[2:])
        try:
            listeners.append(listen_on(family, address))
        except OSError as exc:
            if host is None and family == socket.AF_INET6 and not listeners:
                continue  # no IPv6 here: IPv4 alone will do
            for sock in listeners:
                sock.close()
            raise UserError(bind_error(exc, host or 'all interfaces', address[1]))
    return listeners


def listen_on(family, address):
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == 'posix':  # on Windows this would let others steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == '::':
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (AttributeError, OSError):
                pass  # IPv6 only; open_listeners adds an IPv4 socket
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def dual_stack(sock):
    """True if sock is IPv6 and also takes IPv4 connections."""
    if sock.family != socket.AF_INET6:
        return False
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (AttributeError, OSError):
        return False


def bind_error(exc, where, port):
    """A one-line explanation of why the server could not listen."""
    if exc.errno == errno.EADDRINUSE:
        return 'port %d is already in use on %s (is another server running?)' % (port, where)
    if exc.errno == errno.EACCES:
        return 'permission denied to listen on port %d (ports below 1024 need root)' % port
    if exc.errno == errno.EADDRNOTAVAIL:
        return 'cannot listen on %s: not an address of this machine' % where
    return 'cannot listen on %s port %d: %s' % (where, port, exc.strerror)


def lan_addresses():
    """This machine's non-loopback addresses, found without sending a packet:
    connecting a UDP socket only asks the routing table which address the
    machine would send from."""
    found = []
    for family, probe in ((socket.AF_INET, '198.51.100.1'), (socket.AF_INET6, '2001:db8::1')):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                address = sock.getsockname()[0]
        except OSError:
            continue
        if address not in ('0.0.0.0', '::') and not address.startswith('127.'):
            found.append(address)
    return found


def server_banner(listeners, fingerprint=None, password=False, operators=False, web=False):
    """What the server prints on start: where it listens, how to join (with
    TLS, the certificate's fingerprint for clients to check), and what
    protects the room."""
    bound = [sock.getsockname() for sock in listeners]
    lines = ['chat.py %s listening on %s%s' % (
        __version__, ', '.join(printable_address(a) for a in bound),
        ' (IPv4 and IPv6)' if any(dual_stack(s) for s in listeners) else '')]
    if fingerprint:
        lines.append('TLS certificate SHA-256 fingerprint: %s' % fingerprint)
    port = bound[0][1]
    hosts = [a[0] for a in bound if a[0] not in ('::', '0.0.0.0')]
    if not hosts:
        hosts = lan_addresses() or ['localhost']
    for host in hosts:
        address = printable_address((host, port))
        if fingerprint:
            lines.append('join with: python3 chat.py client %s --tls   (or: openssl s_client '
                         '-quiet -connect %s)' % (join_address(host, port), address))
        else:
            lines.append('join with: python3 chat.py client %s   (or: nc %s %d)'
                         % (join_address(host, port), address.rsplit(':', 1)[0].strip('[]'),
                            port))
        if web:
            lines.append('       or open %s://%s/ in a browser' % (
                'https' if fingerprint else 'http', address))
    lines.append('security: %s, %s, %s' % (
        'TLS' if fingerprint else 'no TLS (anyone on the network can read the room)',
        'a room password' if password else 'no room password',
        'operators (/op)' if operators else 'no operators'))
    return '\n'.join(lines)


def join_address(host, port):
    """How to name host and port on the client's command line: the port only
    if it is not the default."""
    if port == DEFAULT_PORT:
        return host
    return printable_address((host, port))


def make_log(quiet=False, stream=None):
    """The server's one logging funnel: timestamped lines on stderr, with
    anything unprintable escaped so a log can never drive a terminal.  If
    stderr goes away (a closed pipe), the server carries on unlogged."""
    broken = []

    def log(message):
        if quiet or broken:
            return
        out = stream or sys.stderr
        try:
            out.write('%s %s\n' % (time.strftime('%Y-%m-%d %H:%M:%S'),
                                   message.translate(LOG_ESCAPES)))
            out.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            broken.append(True)
    return log


# --- Durable history: the data log ------------------------------------------

# One record per line of DIR/history.log, fields separated by tabs (names,
# rooms and text never hold a tab or a newline):
#     2026-12-01T18:15:03Z  #lobby  <alice> hello  1c291ca3
# when (UTC), the room, the line as it was sent (its marker names the
# sender: "<alice> ", "* alice ", or the "-!- alice set the topic: "
# notice), and the CRC-32 of what precedes it, so a damaged record is
# recognised and skipped.
RECORD = re.compile(rb'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\t(#[^\t\n]+)\t([^\t\n]+)\t([0-9a-f]{8})\Z')
TOPIC_SET = re.compile(r'-!- (\S+) set the topic: (.*)\Z')


def data_record(stamp, room, line):
    """The record for one line (without its newline) said in room at stamp."""
    return tab_record((stamp, room.encode('utf-8'), line))


def tab_record(fields):
    """A record: the fields (bytes, no tab or newline in them), tabs between,
    then the CRC-32 of all that."""
    body = b'\t'.join(fields)
    return b'%s\t%08x\n' % (body, zlib.crc32(body))


def parse_record(raw):
    """(stamp, room name without '#', line) from a record, or None if damaged."""
    match = RECORD.match(raw)
    if not match or int(match.group(4), 16) != zlib.crc32(raw[:match.start(4) - 1]):
        return None
    try:
        room = match.group(2).decode('utf-8')[1:]
        match.group(3).decode('utf-8')
    except UnicodeDecodeError:
        return None
    if name_problem(room) is not None:
        return None
    return match.group(1), room, match.group(3)


def read_saved(path):
    """The bytes of a file of DIR (none if it is not there yet)."""
    try:
        with open(path, 'rb') as saved:
            return saved.read()
    except FileNotFoundError:
        return b''
    except OSError as exc:
        raise UserError('cannot read %s: %s' % (path, exc.strerror))


def replace_synced(path, data):
    """Put data in place of the file at path, whole or not at all: written
    to a new file (mode 600), synced, and renamed over it, so that a crash
    or a power cut leaves the old file or the new one."""
    fresh = path + '.new'
    with os.fdopen(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'wb') as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(fresh, path)


class DataLog:
    """--data DIR: every public line, action and topic of every room,
    appended to DIR/history.log and reloaded at start.  The loop collects
    a turn's records and writes them in one write() before that turn's
    lines are sent (Server.end_turn); fsync follows --fsync: after every
    write (always), once a second from a thread of its own (everysec, as
    Redis does for appendfsync), or when the system likes (no).  Past
    max_bytes the log is rewritten with what the rooms keep.  A write that
    fails (a full disk, a read-only DIR) is logged once; the records wait,
    up to DATA_MAX_PENDING bytes, and writing is tried again every
    DATA_RETRY_SEC.  DIR is locked: a second server refuses to start."""

    def __init__(self, folder, fsync='everysec', max_bytes=DEFAULT_DATA_MAX, log=None):
        self.path = os.path.join(folder, DATA_LOG_NAME)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.log = log or (lambda message: None)
        self.pending = bytearray()   # records not yet written
        self.fd = None
        self.size = 0                # of the log file, as written
        self.compacted_size = 0      # after the last compaction: compact again past twice it
        self.failing = None          # the error that stopped writing, logged once
        self.retry_at = 0.0
        self.retry_timer = False     # a timer will make a loop turn to try again
        self.dropped = 0             # records lost while the disk refused them
        self.unsynced = False
        self.sync_lock = threading.Lock()  # the fsync thread and a compaction's swap
        self.stopping = threading.Event()
        self.people = PeopleLog(folder, self.log, self.sync_lock)
        self.lock_fd = None          # DIR, open while its lock is held (POSIX)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if fcntl is not None:
                self.lock_fd = os.open(folder, os.O_RDONLY)
        except OSError as exc:
            raise UserError('cannot use %s for --data: %s' % (folder, exc.strerror))
        if fcntl is not None:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self.lock_fd)
                raise UserError('%s is in use by another chat.py server (its lock is held)'
                                % folder)
        if fsync == 'everysec':
            threading.Thread(target=self.sync_every_second, daemon=True).start()

    def load(self, server):
        """Give each room its history and topic back from the log; skip
        damaged records (a torn last one is cut off, so appends start clean)."""
        data = read_saved(self.path)
        records, torn = data.split(b'\n'), 0
        if records[-1]:  # no newline after the last: a write cut short
            torn, good_end = 1, data.rfind(b'\n') + 1
            try:
                os.truncate(self.path, good_end)
            except OSError:
                self.pending += b'\n'  # end it instead: it is skipped as damaged
            data = data[:good_end]
        records.pop()
        damaged, rooms = 0, set()
        for raw in filter(None, records):  # an empty line ends a torn record
            parsed = parse_record(raw)
            if parsed is None:
                damaged += 1
                continue
            stamp, name, line = parsed
            room = server.room_named(name)
            rooms.add(room)
            topic = TOPIC_SET.match(line.decode('utf-8'))
            if topic:
                room.topic = topic.group(2)[:MAX_TOPIC_CHARS]
                room.topic_said = (stamp, line + b'\n')
            elif line.startswith((b'<', b'* ')) and room.history.most:
                room.history.add(stamp, line + b'\n')
        self.size = len(data)
        self.log('data: %s records of %s from %s%s%s' % (
            len(records) - damaged, plural(len(rooms), 'room'), self.path,
            ', %s skipped' % plural(damaged, 'damaged record') if damaged else '',
            ', a torn last record cut off' if torn else ''))
        self.open()

    def open(self):
        """Open the log for appending; False (logged once) if it cannot be."""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            return True
        except OSError as exc:
            self.failed(exc)
            return False

    def record(self, stamp, room, lines):
        """Queue a record for each line of lines, to go in this turn's write."""
        for line in lines[:-1].split(b'\n'):
            self.pending += data_record(stamp, room, line)

    def write(self, server):
        """Write what this turn said, then what it changed of people.log."""
        self.write_history(server)
        if self.people.pending or self.people.broken is not None:
            self.people.write(server, self.fsync == 'always')
            self.unsynced = True
            if self.people.broken is not None:
                self.turn_at(server, self.people.broken)

    def write_history(self, server):
        """Write what this turn said, in one write(); on failure keep it
        (bounded) and try again later; compact once the log is too big."""
        if not self.pending:
            return
        if (self.failing and time.monotonic() < self.retry_at) or (
                self.fd is None and not self.open()):
            self.wait_to_retry(server)
            return
        try:
            written = os.write(self.fd, self.pending)
            if self.fsync == 'always':
                os.fsync(self.fd)
        except OSError as exc:
            self.failed(exc)
            self.wait_to_retry(server)
            return
        del self.pending[:written]
        self.size += written
        self.unsynced = True
        if self.failing and not self.pending:
            self.log('data: writing %s again%s' % (self.path, ' (%s lost)' % plural(
                self.dropped, 'record') if self.dropped else ''))
            self.failing, self.dropped = None, 0
        if self.size > max(self.max_bytes, 2 * self.compacted_size):
            self.compact(server)

    def failed(self, exc):
        if self.failing is None:
            self.log('data: cannot write %s: %s; history is kept in memory, writing is '
                     'tried again every %g s' % (self.path, exc.strerror or exc, DATA_RETRY_SEC))
        self.failing = exc
        self.retry_at = time.monotonic() + DATA_RETRY_SEC

    def wait_to_retry(self, server):
        """Keep the records (bounded) until it is time to try again."""
        self.bound_pending()
        self.turn_at(server, self.retry_at)

    def turn_at(self, server, when):
        """Make sure a loop turn comes at when (a monotonic time), so that a
        failed write is tried again even on a quiet server."""
        if not self.retry_timer:
            self.retry_timer = True
            server.call_later(max(0.0, when - time.monotonic()), self.retry_turn)

    def retry_turn(self, _):
        self.retry_timer = False  # the turn this timer makes writes (Server.end_turn)

    def bound_pending(self):
        """Past DATA_MAX_PENDING the oldest waiting records go (counted).  A
        record the disk took part of is ended with a newline: at the next
        start it is skipped as damaged, and no other record is harmed."""
        if len(self.pending) > DATA_MAX_PENDING:
            cut = self.pending.index(b'\n', len(self.pending) - DATA_MAX_PENDING) + 1
            self.dropped += self.pending[:cut].count(b'\n')
            del self.pending[:cut]
            self.pending[:0] = b'\n'

    def compact(self, server):
        """Rewrite the log with what the rooms keep (their history and
        topic), fsync it and put it in place: the log stays near the size
        of what a restart would load."""
        records = self.kept(server, None)
        if len(records) > self.max_bytes // 2:  # then what newcomers are shown
            records = self.kept(server, server.history)
        try:
            with self.sync_lock:
                replace_synced(self.path, records)
                os.close(self.fd)
                self.fd = None
            self.size = self.compacted_size = len(records)
            self.log('data: compacted %s to %s' % (self.path, human_bytes(self.size)))
        except OSError as exc:
            self.failed(exc)
        if self.fd is None:
            self.open()

    @staticmethod
    def kept(server, most):
        """The records of what the rooms keep: each one's topic and its last
        most lines (None: all its history)."""
        records = bytearray()
        for room in server.rooms.values():
            said = list(room.history)
            if most is not None:
                said = said[max(0, len(said) - most):]  # a quiet room keeps all it has
            said += [room.topic_said] if room.topic_said else []
            for stamp, line in sorted(said, key=lambda entry: entry[0]):
                records += data_record(stamp, room.shown, line[:-1])
        return records

    def sync_every_second(self):
        """--fsync everysec, off the loop: at most a second of lines is lost
        in a power cut (a crash of the server alone loses nothing)."""
        while not self.stopping.wait(1.0):
            if self.unsynced:
                self.unsynced = False
                with self.sync_lock:
                    for fd in (self.fd, self.people.fd):
                        try:
                            if fd is not None:
                                os.fsync(fd)
                        except OSError:
                            pass  # the next write says what is wrong

    def close(self):
        """Write what is left and sync it (at shutdown)."""
        self.stopping.set()
        if self.pending and self.fd is not None:
            try:
                os.write(self.fd, self.pending)
            except OSError:
                pass
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        self.people.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # and with it the lock
            self.lock_fd = None


# DIR/people.log is kept the same way, one record per line, its fields
# separated by tabs, the last the CRC-32 of the others; the first says when
# (UTC) and the second what:
#     TIME  name     NAME  HASH        NAME is registered (/register), with this
#                                      password (hash_password: never the password)
#     TIME  unname   NAME              and no longer (/unregister, /drop)
#     TIME  mail     NAME  FROM  TEXT  a /msg for NAME, waiting until it comes in
#     TIME  read     NAME              NAME was given the messages that waited
#     TIME  session  DIGEST  NAME  #ROOM  IP  STAMP  COUNT
#                                      a resume token (its SHA-256) held by NAME
#                                      in #ROOM, whose log then ended with the
#                                      COUNT-th line stamped STAMP ("-": none)
#     TIME  ended    DIGEST            that session is over (quit, kick, expired)
# It holds password hashes and private messages: mode 0600, in a 0700 DIR.
PEOPLE_FIELDS = {'name': 2, 'unname': 1, 'mail': 3, 'read': 1, 'session': 6, 'ended': 1}


def parse_people_record(raw):
    """(stamp, kind, [fields]) from a people.log record, or None if damaged."""
    fields = raw.split(b'\t')
    if len(fields) < 3 or fields[-1] != b'%08x' % zlib.crc32(raw[:-len(fields[-1]) - 1]):
        return None
    try:
        stamp, kind, *rest = [field.decode('utf-8') for field in fields[:-1]]
    except UnicodeDecodeError:
        return None
    if PEOPLE_FIELDS.get(kind) != len(rest) or stamp_seconds(stamp) is None:
        return None
    return stamp.encode(), kind, rest


def fresh_mail(box):
    """The waiting messages (stamp, sender, text) not yet MAIL_KEEP_SEC old."""
    since = time.time() - MAIL_KEEP_SEC
    return [mail for mail in box if stamp_seconds(mail[0].decode()) > since]


class PeopleLog:
    """--data DIR/people.log: registered names, the messages waiting for
    them, and the sessions a restart must keep (see its format above).
    Changes are appended with the turn's history (DataLog.write), in one
    write(); the file is rewritten whole, with only what is still true, at
    start, past PEOPLE_COMPACT_BYTES, and after a failed write (a full
    disk): the server holds all of it in memory, so nothing waits in a
    queue that could grow."""

    def __init__(self, folder, log, sync_lock):
        self.path = os.path.join(folder, PEOPLE_LOG_NAME)
        self.log = log
        self.sync_lock = sync_lock   # DataLog's: its fsync thread syncs this file too
        self.fd = None
        self.pending = bytearray()   # records not yet written
        self.sessions = {}           # digest -> its latest session record
        self.size = self.compacted_size = 0
        self.broken = None           # after a failed write: when to rewrite it whole

    def note(self, kind, *fields):
        """A change, to be written at the end of this turn."""
        record = tab_record([utc_stamp(time.time()), kind.encode()]
                            + [field.encode('utf-8') for field in fields])
        if kind == 'session':
            self.sessions[fields[0]] = record
        elif kind == 'ended':
            self.sessions.pop(fields[0], None)
        self.pending += record

    def load(self, server):
        """Fill server.accounts and server.mail; the sessions that were open,
        digest -> (name, #room, ip, stamp, count).  Damaged records are
        skipped and counted; then the file is rewritten compact."""
        data = read_saved(self.path)
        opened, damaged = {}, 0
        for raw in data.split(b'\n'):
            parsed = parse_people_record(raw) if raw else None
            if parsed is None:
                damaged += bool(raw)
                continue
            stamp, kind, fields = parsed
            key = name_key(fields[0])
            if kind == 'name':
                server.accounts[key] = tuple(fields)
            elif kind == 'unname' or kind == 'read':
                server.mail.pop(key, None)
                if kind == 'unname':
                    server.accounts.pop(key, None)
            elif kind == 'mail' and key in server.accounts:
                server.mail.setdefault(key, []).append((stamp, fields[1], fields[2]))
            elif kind == 'session':
                self.sessions[fields[0]] = raw + b'\n'
                opened[fields[0]] = fields[1:]
            elif kind == 'ended':
                self.sessions.pop(fields[0], None)
                opened.pop(fields[0], None)
        for key, box in list(server.mail.items()):
            server.mail[key] = fresh_mail(box)
            if not server.mail[key]:
                del server.mail[key]
        self.log('data: %s, %s and %s from %s%s' % (
            plural(len(server.accounts), 'registered name'),
            plural(sum(map(len, server.mail.values())), 'waiting message'),
            plural(len(opened), 'open session'), self.path,
            ', %s skipped' % plural(damaged, 'damaged record') if damaged else ''))
        self.rewrite(server)
        return opened

    def kept(self, server):
        """The records of what is still true: names, waiting mail, sessions."""
        records = bytearray()
        for key, (name, hashed) in server.accounts.items():
            records += tab_record([server.stamp(), b'name', name.encode(), hashed.encode()])
            for stamp, sender, text in server.mail.get(key, ()):
                records += tab_record([stamp, b'mail'] + [
                    field.encode() for field in (name, sender, text)])
        for record in self.sessions.values():
            records += record
        return records

    def write(self, server, fsync):
        """Append this turn's changes in one write(); after a failure, or
        past the size bound, rewrite the file whole instead."""
        if self.broken is not None or self.size > max(PEOPLE_COMPACT_BYTES,
                                                      2 * self.compacted_size):
            if self.broken is None or time.monotonic() >= self.broken:
                self.rewrite(server)
            return
        if not self.pending:
            return
        try:
            written = os.write(self.fd, self.pending)
            if fsync:
                os.fsync(self.fd)
        except OSError as exc:
            self.failed(exc)
            return
        self.size += written
        del self.pending[:written]

    def rewrite(self, server):
        """Put a compact file in place (written, synced, then renamed over
        the old one) and append from there."""
        records = self.kept(server)
        try:
            replace_synced(self.path, records)
            with self.sync_lock:
                if self.fd is not None:
                    os.close(self.fd)
                    self.fd = None
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self.failed(exc)
            return
        if self.broken is not None:
            self.log('data: writing %s again' % self.path)
        self.broken = None
        self.size = self.compacted_size = len(records)
        del self.pending[:]

    def failed(self, exc):
        """Logged once; the whole file is rewritten when it can be."""
        if self.broken is None:
            self.log('data: cannot write %s: %s; names and sessions are kept in memory, '
                     'writing is tried again every %g s' % (
                         self.path, exc.strerror or exc, DATA_RETRY_SEC))
        self.broken = time.monotonic() + DATA_RETRY_SEC
        del self.pending[:]

    def close(self):
        """Write what is left and sync it (at shutdown)."""
        if self.fd is not None:
            try:
                os.write(self.fd, self.pending)
                os.fsync(self.fd)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# --- Link: several servers as one chat, through Redis -------------------------
#
# Every server started with the same --redis URL and --cluster is one chat.
# Whatever the others must know goes as an event on one Redis stream, the
# bus (CLUSTER:bus, XADD), and every server, the sender's own included, acts
# on the events in the one order the stream has.  So a room's lines come in
# the same order everywhere, and when two servers let two people take one
# name at the same moment, every server agrees whose claim came first.
# A stream, so that a server cut off for a moment reads on from where it
# stopped (XREAD), and misses nothing the bus still keeps.  But it hears
# the bus live by pub/sub: the script that adds an event also publishes it,
# with its entry's id, on the bus's channel (CLUSTER:bus@DB: channels are
# not per database), in the same step, so in the same order.  Pushed, an
# event costs Redis one write to each server; with a blocking XREAD, each
# server would also ask again after every read, waking Redis each time (a
# third of Redis's CPU at light load, on cores the servers need then).
# All the servers of a chat must run a chat.py that publishes so.
#
# An event is "SERVER<TAB>KIND<TAB>FIELDS" in UTF-8, SERVER a random id the
# server took at start.  The last field may hold tabs; no other can.  N
# numbers the events a server must see come back (Link.sent): one that
# never does (the link broke first) is heard on its own server at least,
# or, for a private message, its sender is told it did not go.
#
#     say N ROOM STAMP SENDER LINES public lines (messages, actions) said in ROOM
#     topic N ROOM SETTER TEXT
#     in NAME ROOM CLAIMED          NAME is in ROOM (came in, or moved); it
#                                   took its name at CLAIMED (time.time())
#     nick OLD NEW ROOM CLAIMED     a new name
#     out NAME REASON               NAME left the chat
#     lost NAME, back NAME          its connection was lost; it came back
#     away NAME REASON              REASON empty: back
#     op NAME                       NAME became an operator
#     pm N FROM TO TEXT             a private message, for TO's server
#     to NAME LINES                 lines for NAME alone (answers to NAME's
#                                   commands run on another server)
#     act TARGET BY COMMAND         an operator's command on TARGET, run by
#                                   TARGET's server
#     ban WHAT SECONDS BY SHOWN     an operator's ban of an address (WHAT: its
#                                   network) or a name (WHAT: "name")
#     unban WHAT                    an operator lifted a ban (/unban WHAT)
#     wall N LINE                   a notice for every room
#     hello                         SERVER (re)linked: the others send state
#     state JSON                    everyone on SERVER: [[name, room, claimed,
#                                   away, operator, lost], ...]
#     moved NAME CLAIMED            NAME resumed on SERVER: it is SERVER's now
#     beat                          SERVER is alive
#     bye                           SERVER stops: its people leave
#
# People on other servers are Peers without a socket ("mirrors", Peer.home
# is their server), in self.names and in rooms like anyone, so /who, /rooms,
# /whois, /msg, /ignore and name checks see the whole chat.


class RedisConnection:
    """One nonblocking connection to Redis, in the server's selector.
    Commands go out pipelined, each with what to do with its reply, which
    come back in order.  Any failure
    ends the link (Link.fail), which starts again later."""

    def __init__(self, link):
        self.link = link
        self.sock = None
        self.ready = False           # connected, TLS done: output may go
        self.outbuf = bytearray()
        self.reader = RespReader()
        self.waiting = collections.deque()  # per command sent, its callback or None
        self.pushes = None           # subscribed: what to do with each message
        self.answered_at = 0.0       # when Redis last answered, or was asked with nothing
        self.events = 0              # waiting (Link.beat restarts a link silent too long)

    def open(self):
        link = self.link
        sock = socket.socket(link.address[0], socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a line waits for no ACK
        self.sock = sock
        problem = sock.connect_ex(link.address[1])
        if problem not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(problem, os.strerror(problem))
        self.want(selectors.EVENT_WRITE)
        url = link.url
        if url.password is not None:
            self.call(None, 'AUTH', *([url.username] if url.username else []) + [url.password])
        if url.db:
            self.call(None, 'SELECT', url.db)

    def want(self, events):
        if events != self.events:
            if self.events:
                self.link.server.selector.modify(self.sock, events, self)
            else:
                self.link.server.selector.register(self.sock, events, self)
            self.events = events

    def call(self, callback, *args):
        """Queue a command; callback(reply) when its reply comes."""
        self.outbuf += resp_command(*args)
        if not self.waiting:
            self.answered_at = time.monotonic()
        self.waiting.append(callback)
        if len(self.outbuf) > LINK_MAX_QUEUED or len(self.waiting) > LINK_MAX_QUEUED // 64:
            raise RespFailure('Redis is not keeping up: %s queued' % human_bytes(
                len(self.outbuf)))

    def on_event(self, mask):
        if not self.ready:
            self.connect_step()
        if self.ready and mask & selectors.EVENT_READ:
            self.read()
        if self.sock is not None:  # (a reply may have found the link broken)
            self.flush()

    def connect_step(self):
        """The TCP connection is made (or failed); then, for rediss://, the
        TLS handshake, a step per event."""
        if not isinstance(self.sock, getattr(ssl, 'SSLSocket', ())):
            problem = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if problem:
                raise OSError(problem, os.strerror(problem))
            if self.link.tls is None:
                self.ready = True
                return
            self.link.server.selector.unregister(self.sock)
            self.events = 0
            self.sock = self.link.tls.wrap_socket(self.sock, server_hostname=self.link.url.host,
                                                  do_handshake_on_connect=False)
        try:
            self.sock.do_handshake()
            self.ready = True
        except ssl.SSLWantReadError:
            self.want(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self.want(selectors.EVENT_WRITE)

    def read(self):
        """What Redis sent (as much as is there, up to LINK_READ_BYTES),
        then each complete reply to its command's callback."""
        got, chunk = 0, self.link.chunk
        pending = getattr(self.sock, 'pending', lambda: 0)  # TLS: decrypted, not yet read
        while got < LINK_READ_BYTES or pending():
            try:
                size = self.sock.recv_into(chunk)
            except WOULD_BLOCK:
                break
            if not size:
                raise OSError(errno.ECONNRESET, 'Redis closed the connection')
            self.reader.feed(chunk[:size])
            got += size
        for reply in self.reader.replies():
            if self.sock is None:
                return  # a callback found the link broken: this connection is done
            if self.pushes is not None and isinstance(reply, list) and reply[:1] == [b'message']:
                self.pushes(reply[2])  # (a message, not an answer: ['message', CHANNEL, IT])
                continue
            if not self.waiting:
                raise RespFailure('a reply to no command')
            callback = self.waiting.popleft()
            self.answered_at = time.monotonic()
            if callback is not None:
                callback(reply)
            elif isinstance(reply, RespError):
                raise reply

    def flush(self):
        if self.ready and self.outbuf:
            del self.outbuf[:send_some(self.sock, self.outbuf)]
        if self.ready:
            self.want(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0))

    def close(self, linger=False):
        """Close now; with linger, first try for a moment to send what is queued."""
        if self.sock is None:
            return
        if self.events:
            self.link.server.selector.unregister(self.sock)
        if linger and self.ready and self.outbuf:
            try:
                self.sock.settimeout(SHUTDOWN_FLUSH_SEC)
                self.sock.sendall(self.outbuf)
            except OSError:
                pass
        self.sock.close()
        self.sock = None


def redis_address(url):
    """Where the Redis of url is, looked up once (a name lookup blocks)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(url.host, url.port, 0,
                                                      socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError('cannot find the Redis host %s: %s' % (url.host, exc.strerror))
    return family, address


def check_redis(url, address, tls, channel):
    """At start, before the loop: reach Redis, log in, PING, and subscribe
    to the bus's channel (an ACL user may lack it: Redis 7's have no channel
    unless given), blocking for at most LINK_CONNECT_SEC; a UserError says
    what went wrong."""
    where = '%s:%d' % (url.host, url.port)
    try:
        sock = socket.create_connection(address[1][:2], LINK_CONNECT_SEC)
        with sock:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=url.host)
            commands = [('SELECT', url.db), ('PING',), ('SUBSCRIBE', channel)]
            if url.password is not None:
                commands.insert(0, ['AUTH'] + ([url.username] if url.username else [])
                                + [url.password])
            sock.sendall(b''.join(resp_command(*command) for command in commands))
            reader, replies = RespReader(), []
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise OSError(errno.ECONNRESET, 'it closed the connection')
                reader.feed(data)
                replies += reader.replies()
    except (OSError, RespFailure, ValueError) as exc:  # 3.6: CertificateError is a ValueError
        if ssl is not None and isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
            raise UserError('cannot speak TLS with Redis at %s: %s' % (
                where, getattr(exc, 'reason', None) or exc))
        raise UserError('cannot reach Redis at %s: %s' % (where, getattr(exc, 'strerror', None)
                                                          or exc))
    for command, reply in zip(commands, replies):
        if isinstance(reply, RespError):
            what = ' the channel %s' % channel if command[0] == 'SUBSCRIBE' else ''
            raise UserError('Redis at %s refused%s: %s' % (where, what, reply.args[0]))


# Public lines go on the bus and into their room's history (a stream, kept
# to HISTORY_MAX_LINES entries) in one step, so that both have them in the
# same order; each history entry is the say event and names its bus entry.
# The rooms Redis keeps history for are a sorted set of their keys by the
# time last said in (the entry's ms; a topic's, by Redis's clock too), and a
# hash of their names: past LINK_ROOMS_MAX, the oldest go, with their
# history and topic.  Both scripts' first keys and arguments are
# KEEP_ROOM_LUA's: the rooms said in, their names, their topics; the room's
# key and name, LINK_ROOMS_MAX, and the history keys' prefix.
KEEP_ROOM_LUA = b"""
local function keep_room(stamp)
  redis.call('ZADD', KEYS[1], stamp, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
  if over > 0 then
    local gone = redis.call('ZPOPMIN', KEYS[1], over)
    for i = 1, #gone, 2 do
      redis.call('HDEL', KEYS[2], gone[i])
      redis.call('HDEL', KEYS[3], gone[i])
      redis.call('DEL', ARGV[4] .. gone[i])
    end
  end
end
"""
# Every event goes on the bus through to_bus: added to the stream, and
# published with its id ("ID<TAB>EVENT") on the channel.
BUS_LUA = b"""
local function to_bus(bus, keep, channel, event)
  local id = redis.call('XADD', bus, 'MAXLEN', '~', keep, '*', 'e', event)
  redis.call('PUBLISH', channel, id .. '\\t' .. event)
  return id
end
"""
PUBLISH_SCRIPT = BUS_LUA + b"""
return to_bus(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
"""
SAY_SCRIPT = KEEP_ROOM_LUA + BUS_LUA + b"""
local id = to_bus(KEYS[4], ARGV[5], ARGV[8], ARGV[6])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[6], 'b', id)
keep_room(string.match(id, '^%d+'))
return id
"""
TOPIC_SCRIPT = KEEP_ROOM_LUA + b"""
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
local now = redis.call('TIME')
keep_room(string.format('%d%03d', now[1], math.floor(now[2] / 1000)))
"""
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest()
SAY_SCRIPT_SHA = hashlib.sha1(SAY_SCRIPT).hexdigest()
TOPIC_SCRIPT_SHA = hashlib.sha1(TOPIC_SCRIPT).hexdigest()
TAKE_MAIL_SCRIPT = b"""
local mail = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return mail
"""


# The kinds of event on the bus (see the format above): each has its on_KIND.
BUS_EVENTS = frozenset(('say', 'topic', 'in', 'nick', 'out', 'lost', 'back', 'away', 'op',
                        'pm', 'heard', 'to', 'act', 'ban', 'unban', 'name', 'unname', 'wall', 'hello',
                        'state', 'moved',
                        'beat', 'bye'))


def said_fields(fields):
    """A say event's fields: (N, ROOM, STAMP, SENDER, LINES), as bytes."""
    return fields.split(b'\t', 4)


# A session in Redis, as Link.note_session keeps it for whichever server the
# person resumes on: marks are bus entries as stream_id (lost: None if the
# connection was not lost); claimed, the name's claim as repr() keeps it;
# ignoring, the names ignored now; ignored, ignore_spans.
SessionRecord = collections.namedtuple('SessionRecord', 'server name claimed mark private_mark '
                                       'lost apart ignoring ignored muted')


def session_record(reply):
    """HGETALL's reply (field, value, ...) as a SessionRecord, or None if
    there is no such session or its record is damaged.  Fields added later
    may be missing from an older server's record: private messages then
    count from the mark, and nothing is ignored but those ignored now."""
    if not isinstance(reply, list) or not reply:
        return None
    fields = dict(zip(reply[::2], reply[1::2]))
    try:
        mark = stream_id(fields[b'mark'])
        private_mark = stream_id(fields.get(b'private_mark', fields[b'mark']))
        lost = stream_id(fields[b'lost']) if fields.get(b'lost') else None
        server, name = fields[b'server'].decode('ascii'), fields[b'name'].decode('utf-8')
        claimed = fields[b'claimed'].decode('ascii')
    except (KeyError, ValueError):  # (UnicodeDecodeError is one)
        return None
    ignoring = fields.get(b'ignoring', b'').decode('utf-8', 'replace').split('\t')
    return SessionRecord(server, name, claimed, mark, private_mark, lost,
                         bool(fields.get(b'apart')), [other for other in ignoring if other],
                         ignore_spans(fields),
                         fields.get(b'muted', b'').decode('utf-8', 'replace') or None)


def ignore_spans(session):
    """Whom a session record's fields say its person ignored: (name, first,
    last) for each span (bus entries as stream_id; last None: still
    ignored).  A record from before spans were kept: those ignored now,
    from the start."""
    if b'ignored' not in session:
        names = session.get(b'ignoring', b'').decode('utf-8', 'replace').split('\t')
        return [(name, (0, 0), None) for name in names if name]
    spans = []
    for span in session[b'ignored'].split(b'\t'):
        try:
            name, first, last = span.split(b' ')
            spans.append((name.decode('utf-8', 'replace'), stream_id(first),
                          None if last == b'+' else stream_id(last)))
        except ValueError:  # damaged: that span is not known
            continue
    return spans


def stored_json(value, *kinds):
    """A JSON list kept in Redis by Link, its items of kinds (types), or
    None if it is not one (written by something else, or damaged)."""
    try:
        stored = json.loads(value.decode('utf-8', 'replace'))
    except ValueError:
        return None
    if isinstance(stored, list) and len(stored) == len(kinds) and all(
            isinstance(item, kind) for item, kind in zip(stored, kinds)):
        return stored
    return None


class KeptPrivately:
    """The private messages to a person of another server, as this server
    read them on the bus: (bus entry, line), the newest that fit limit bytes."""

    __slots__ = ('lines', 'size', 'limit', 'forgotten')

    def __init__(self, limit):
        self.lines, self.size, self.limit = collections.deque(), 0, limit
        self.forgotten = None  # the bus entry of the newest one dropped

    def add(self, entry, line):
        self.lines.append((entry, line))
        self.size += len(line)
        while self.size > self.limit:
            self.forgotten, dropped = self.lines.popleft()
            self.size -= len(dropped)

    def forgot_after(self, mark):
        return self.forgotten is not None and self.forgotten > mark


def ban_field(what, shown):
    """A ban's field in the bans hash: the network, or the banned name's key."""
    return 'name:' + name_key(shown) if what == 'name' else what


def unban_field(text):
    """The field in the bans hash that /unban TEXT lifts."""
    network = banned_network(text)
    return str(network) if network is not None else ban_field('name', text)


def bus_channel(cluster, db):
    """The bus's pub/sub channel: channels are not per database."""
    return '%s:bus@%d' % (cluster, db)


def stream_id(text):
    """A Redis stream entry's id (b'MS-SEQ') as numbers, to compare."""
    milliseconds, _, sequence = text.partition(b'-')
    return int(milliseconds), int(sequence or 0)


class Link:
    """--redis: this server's part of one chat with every server on the
    same Redis and --cluster (the format and the rules are above)."""

    def __init__(self, url, address, cluster=DEFAULT_CLUSTER, tls=None):
        self.url, self.address, self.tls = url, address, tls
        self.cluster = cluster
        self.bus = cluster + ':bus'
        self.channel = bus_channel(cluster, url.db)
        self.id = secrets.token_hex(6)
        self.server = None
        self.commands = self.reader = None
        self.last_id = None          # of the last bus entry read
        self.held = None             # ... from the channel, while the stream is caught up
        self.held_bytes = 0          # with (follow_bus): their size
        self.first_id = None         # of the bus entry this server began after
        self.rooms_read = False      # the rooms' history and topics, at the first link
        self.histories = None        # ... keys of the rooms whose history is here until
        # then (--data, or loaded from Redis at a try that broke): not loaded again
        self.sent_count = 0          # numbered events sent (say, pm, topic, wall)
        self.settled = 0             # ... of those, the last back or taken for lost
        self.up = False
        self.down_told = False       # this outage was told (once)
        self.tries = 0               # to link again, since it went down
        # Numbered events sent, until they come back from Redis: (N, what to do
        # then, what to do if they never do: the link broke, or the bus lost them).
        self.sent = collections.deque()
        self.said_bytes = 0          # of their lines: past half a backlog cap, input waits
        self.resuming = set()        # peers whose /resume waits for Redis's answer
        self.private_for = {}        # mirror -> KeptPrivately: for its resume here
        self.unsaid = {}             # (hash, field) -> to do when linked: changed while down
        self.redis_new = False       # at this link, give Redis all held here (load_shared)
        self.epoch = None            # Redis's, at the last link
        self.loading = None          # while the shared hashes are read: fields changed since
        self.ended = set()           # sessions ended while the link was down: Redis forgets
        self.unconfirmed = {}        # name_key -> local Peer whose claim is not back yet
        self.heard = {}              # server id -> when last heard (monotonic)
        self.people = {}             # server id -> {name_key: mirror}
        self.aliases = {}            # (server id, name_key) -> mirror: see mirror_of
        self.dead = set()            # servers unheard for LINK_DEAD_SEC
        self.guests = iter(())       # guest numbers taken from Redis
        # Every read from Redis lands here first: a fresh buffer per recv()
        # would cost a large allocation (mmap, munmap) each time.
        self.chunk = memoryview(bytearray(LINK_READ_CHUNK_BYTES))
        self.guests_left = 0

    def start(self, server):
        self.server = server
        self.connect()
        self.later(LINK_BEAT_SEC, self.beat)

    def later(self, delay, callback, argument=None):
        """A timer of the link's: a bug in it starts the link again; it
        never stops the server (Server.guarded lets errors of no peer's out)."""
        def run(argument):
            try:
                callback(argument)
            except Exception as exc:
                self.server.log('link: internal error: %r' % exc)
                self.fail(exc)
        self.server.call_later(delay, run, argument)

    # Connection ----------------------------------------------------------------

    def connect(self, _=None):
        """Two connections: one for commands, pipelined; one that waits on
        the bus.  Read from where this server stopped, if it was linked
        before: what it missed while cut off comes first (if the bus still
        has it)."""
        self.commands, self.reader = RedisConnection(self), RedisConnection(self)
        try:
            for connection in (self.commands, self.reader):
                connection.open()
        except OSError as exc:
            self.fail(exc)
            return
        for script in (PUBLISH_SCRIPT, SAY_SCRIPT, TOPIC_SCRIPT):
            self.commands.call(None, 'SCRIPT', 'LOAD', script)
        self.reader.call(self.linked, 'XREVRANGE', self.bus, '+', '-', 'COUNT', 1)
        self.take_guest_numbers()

    def position(self):
        """The last bus entry read (b'0-0' before any)."""
        return self.last_id or b'0-0'

    def follow_bus(self):
        """Hear the bus on from last_id: subscribe to its channel, then
        catch up from the stream on what came before.  What the channel
        brings meanwhile is held until then."""
        self.held, self.held_bytes = [], 0
        self.reader.pushes = self.on_live
        self.reader.call(self.catch_up, 'SUBSCRIBE', self.channel)

    def catch_up(self, reply=None):
        if isinstance(reply, RespError):
            raise reply
        self.commands.call(self.caught_up, 'XREAD', 'COUNT', LINK_READ_COUNT,
                           'STREAMS', self.bus, self.last_id)

    def caught_up(self, reply):
        """Entries from the stream: more to come if it gave all it was
        asked for; else the held ones, and from now on the channel."""
        if isinstance(reply, RespError):
            raise reply
        entries = reply[0][1] if reply else ()
        for entry_id, fields in entries:
            self.take(entry_id, fields[1])
        if self.commands is None:
            return  # an event broke the link
        if len(entries) == LINK_READ_COUNT:
            self.catch_up()
            return
        held, self.held = self.held, None
        for message in held:
            self.on_live(message)

    def on_live(self, message):
        """An entry from the bus's channel: "ID<TAB>EVENT".  One that the
        stream gave already (as it was caught up with) is passed over."""
        if self.held is not None:
            self.held.append(message)
            self.held_bytes += len(message)
            if self.held_bytes > LINK_MAX_QUEUED:
                raise RespFailure('the bus came faster than it could be caught up with')
            return
        entry_id, _, event = message.partition(b'\t')
        try:
            newer = stream_id(entry_id) > stream_id(self.last_id)
        except ValueError:
            self.server.log('link: not a bus entry on %s: %r' % (self.channel, message[:80]))
            return
        if newer:
            self.take(entry_id, event)

    def take(self, entry_id, event):
        self.last_id = entry_id
        self.on_message(event)

    def linked(self, newest):
        """Linked: say so to everyone, and to the people here if they heard
        it was down; the others answer hello with their state."""
        if isinstance(newest, RespError):
            raise newest
        first = self.last_id is None
        if first:  # from the bus's newest entry on
            self.last_id = self.first_id = newest[0][0] if newest else b'0-0'
            self.histories = {key for key, room in self.server.rooms.items() if len(room.history)}
        if self.rooms_read:
            self.follow_bus()
        else:  # the first link, or one that broke before they all came
            self.load_rooms()
        self.up, self.tries = True, 0
        self.load_shared(first)
        now = time.monotonic()
        for origin in self.people:
            self.heard[origin] = now  # they have LINK_DEAD_SEC to answer
        self.publish('hello')
        self.publish('state', json.dumps(self.state()))
        self.note_sessions()  # what changed while it was down
        for digest in self.ended:
            self.call('DEL', self.key('session', digest))
        self.ended.clear()
        self.say_unsaid('topics')
        if self.rooms_read:
            self.say_linked()
        if self.down_told:
            self.down_told = False
            self.server.wall_here(notice_line(LINKED_AGAIN))

    def fail(self, exc):
        """The link broke: close it, let the people here talk on among
        themselves (told once), and try again after a while."""
        if self.commands is None:
            return  # failed already: the next try is due
        for connection in (self.commands, self.reader):
            connection.close()
        self.commands = self.reader = None
        was_up, self.up = self.up, False
        why = exc.args[0] if isinstance(exc, RespError) else getattr(exc, 'strerror', None) or exc
        if was_up or not self.tries:
            self.server.log('link: lost Redis at %s:%d: %s; trying again' % (
                self.url.host, self.url.port, why))
        if not self.down_told:
            self.down_told = True
            self.server.wall_here(notice_line(LINK_DOWN))
        for peer in self.server.names.values():
            if peer.home is None and peer.session is not None:
                peer.session.apart = True  # (noted at the next link: note_sessions)
        sent, self.sent = self.sent, collections.deque()
        self.settled = self.sent_count  # Redis may yet run some: then they are done with
        for _, _, if_lost in sent:  # in the order they were sent
            if_lost()
        self.unconfirmed.clear()
        resuming, self.resuming = self.resuming, set()
        for peer in resuming:  # their answers will not come
            if peer.sock is not None and peer.close_reason is None:
                self.server.refuse_resume(peer)
                self.server.guarded(self.server.resume, peer)
        wait = LINK_RETRY_SEC[min(self.tries, len(LINK_RETRY_SEC) - 1)]
        self.tries += 1
        self.later(wait * random.uniform(0.8, 1.2), self.connect)

    def flush(self):
        """End of turn: what this turn queued goes to Redis, in one send."""
        for connection in (self.commands, self.reader):
            if connection is not None:
                try:
                    connection.flush()
                except OSError as exc:
                    self.fail(exc)
                    return

    def on_event(self, connection, mask):
        if connection.sock is None:
            return
        try:
            connection.on_event(mask)
        except (OSError, RespError, RespFailure) as exc:
            self.fail(exc)
        except Exception as exc:  # a bug: start the link again rather than stop the server
            self.server.log('link: internal error: %r' % exc)
            self.fail(exc)

    def close(self):
        """At shutdown: the others hear this server's people leave."""
        if self.up:
            self.publish('bye')
        for connection in (self.commands, self.reader):
            if connection is not None:
                connection.close(linger=True)

    # Sending -------------------------------------------------------------------

    def key(self, *parts):
        """A Redis key of this cluster's."""
        return ':'.join((self.cluster,) + parts)

    def event(self, kind, *fields):
        return b'\t'.join([self.id.encode(), kind.encode()] + [
            field if isinstance(field, bytes) else str(field).encode('utf-8')
            for field in fields])

    def call(self, *command, answer=None):
        """Queue a command, and answer(reply) when it comes, if given (else
        the answer does not matter); False if the link is down (or has just
        broken: Redis cannot keep up)."""
        if not self.up:
            return False
        try:
            self.commands.call(answer, *command)
        except RespFailure as exc:
            self.fail(exc)
            return False
        return True

    def publish(self, kind, *fields):
        """Send an event to every server; False if the link is down."""
        return self.call('EVALSHA', PUBLISH_SCRIPT_SHA, 1, self.bus, LINK_BUS_KEEP, self.channel,
                         self.event(kind, *fields))

    def say(self, room, sender, lines):
        """Public lines go through Redis, and are heard when they come back
        (in its order); False if the link is down.  They go into the room's
        history in Redis in the same step (SAY_SCRIPT, which keeps the room)."""
        stamp, number = self.server.stamp(), self.sent_count + 1
        event = self.event('say', number, room.key, stamp, sender.name, lines)
        if not self.keep_room(SAY_SCRIPT_SHA, room, (self.bus, self.key('history', room.key)),
                              (LINK_BUS_KEEP, event, HISTORY_MAX_LINES, self.channel)):
            return False
        heard = functools.partial(self.hear_said, room, sender, stamp, lines)
        self.sent_count = number
        self.sent.append((number, heard, heard))  # back or not, it is heard here
        self.said_bytes += len(lines)
        self.server.direct_bytes += len(lines)  # against this turn's share, as if sent
        return True

    def publish_numbered(self, kind, if_lost, *fields, if_back=lambda: None):
        """publish() an event that must not vanish unnoticed: if it never
        comes back from Redis, if_lost() is done here instead (and if_back()
        if it does)."""
        number = self.sent_count + 1
        if not self.publish(kind, number, *fields):
            return False
        self.sent_count = number
        self.sent.append((number, if_back, if_lost))
        return True

    def came_back(self, origin, number):
        """Whether the Nth numbered event of origin is this server's own,
        back from Redis: None if it is not; True if it was awaited (those
        sent before it that never came back, which the bus lost, count as
        lost); False if it was taken for lost already (the link broke
        first, yet Redis had it), and so is done with."""
        if origin != self.id:
            return None
        number = int(number)
        if number <= self.settled:
            return False
        while self.sent and self.sent[0][0] <= number:
            sent, if_back, if_lost = self.sent.popleft()
            (if_back if sent == number else if_lost)()
        self.settled = number
        return True

    def claim(self, peer, kind, *fields):
        """A local peer took a name (in, nick): it keeps it if no other
        server's claim comes back first (on_claim)."""
        if self.publish(kind, *fields):
            self.unconfirmed[peer.key] = peer

    def topic(self, room, text, setter, again=False):
        """A new topic, for every server, and kept in Redis for later ones
        (TOPIC_SCRIPT: its room counts as said in now); set here as
        it comes back.  If the link is down it is set here only, and given
        to the others when it is up (again: unless another came meanwhile,
        it is set here already)."""
        name = room.name
        def set_here():
            room = self.server.room_named(name)
            if not (again and room.topic == text):
                room.set_topic_here(text, setter)
        if not self.publish_numbered('topic', set_here, name, setter, text, if_back=set_here):
            self.unsaid[('topics', room.key)] = (
                lambda: self.topic(self.server.room_named(name), text, setter, True), True)
            return False
        self.keep_room(TOPIC_SCRIPT_SHA, room, (), (json.dumps([room.name, text, setter]),))
        return True

    def keep_room(self, script, room, keys, args):
        """Run a script that keeps room among those said in (KEEP_ROOM_LUA),
        with its own keys and arguments after those."""
        return self.call('EVALSHA', script, 3 + len(keys), self.key('rooms-said'),
                         self.key('room-names'), self.key('topics'), *keys, room.key, room.name,
                         LINK_ROOMS_MAX, self.key('history', ''), *args)

    # Bans and registered names: on the bus for the servers linked now, and
    # in a hash for those that link later.  CLUSTER:bans has a field per
    # address or network, or "name:" and a name's key, each [WHAT, SHOWN,
    # END, BY] (END in wall-clock seconds, or null: until /unban).
    # CLUSTER:names has a field per registered name's key: [NAME, HASH].
    # Read at every link: what was changed here while the link was down
    # (Link.unsaid) wins, and is said then; to a Redis that came back empty
    # (a new CLUSTER:epoch) every server gives all it holds.

    def ban(self, what, seconds, by, shown):
        """what: a network as text, or 'name' (shown is the name)."""
        end = None if seconds is None else time.time() + seconds
        self.say_or_keep(('bans', ban_field(what, shown)), lambda: self.give_ban(what, shown),
                         ('ban', what, '' if seconds is None else seconds, by, shown),
                         ('HSET', self.key('bans'), ban_field(what, shown),
                          json.dumps([what, shown, end, by])))

    def give_ban(self, what, shown):
        """A ban held here, to Redis and the others (unless it is over)."""
        gate = self.server.gate
        ban = (gate.name_bans.get(name_key(shown)) if what == 'name'
               else gate.bans.get(ipaddress.ip_network(what)))
        if ban is not None and not ban.over():
            self.ban(what, ban.seconds_left(), ban.by, ban.shown)

    def unban(self, text):
        field = unban_field(text)
        self.say_or_keep(('bans', field), lambda: self.unban(text), ('unban', text),
                         ('HDEL', self.key('bans'), field))

    def register(self, name, hashed):
        key = name_key(name)
        self.say_or_keep(('names', key), lambda: self.give_name(key), ('name', name, hashed),
                         ('HSET', self.key('names'), key, json.dumps([name, hashed])),
                         wins=False)  # a name taken while Redis had it registered is not
        # its owner's: it may have been taken here before this server knew

    def give_name(self, key):
        if key in self.server.accounts:
            self.register(*self.server.accounts[key])

    def unregister(self, name):
        key = name_key(name)
        self.call('DEL', self.key('mail', key))  # its messages go with it
        self.say_or_keep(('names', key), lambda: self.unregister(name), ('unname', name),
                         ('HDEL', self.key('names'), key))

    def say_or_keep(self, field, again, event, command, wins=True):
        """Publish event and run command; if the link is down, keep again()
        to be done when it is up (load_shared), over what Redis has then
        unless not wins (then only if Redis has nothing there)."""
        self.unsaid.pop(field, None)
        if self.loading is not None:  # after the snapshot being read: this wins
            self.loading.add(field)
        if not (self.publish(*event) and self.call(*command)):
            self.unsaid[field] = (again, wins)

    def load_shared(self, first):
        """The shared hashes, read.  A Redis whose epoch is not the one
        seen at the last link is new (or came back empty): it is given all
        held here; so is any at a server's first link (names in --data)."""
        def got_epoch(epoch):
            self.redis_new, self.epoch = first or epoch != self.epoch, epoch
        self.loading = set()
        self.call('SET', self.key('epoch'), secrets.token_hex(8), 'NX')
        self.call('GET', self.key('epoch'), answer=got_epoch)
        self.call('HGETALL', self.key('bans'), answer=self.got_bans)
        self.call('HGETALL', self.key('names'), answer=self.got_names)

    def check_epoch(self, epoch):
        """At each beat: a Redis emptied while linked (FLUSHALL, or a
        replica with nothing taking over) has lost its epoch; it is given
        all held here, as at a link."""
        if epoch != self.epoch and self.loading is None and self.up:
            self.server.log('link: Redis at %s:%d lost what it held; giving it back' % (
                self.url.host, self.url.port))
            self.load_shared(False)
            self.note_sessions()

    def got_bans(self, reply):
        """Every ban in Redis: those not over hold here too."""
        if isinstance(reply, RespError):
            return
        gate, now, kept = self.server.gate, time.time(), set()
        for field, value in zip(reply[::2], reply[1::2]):
            field = field.decode('utf-8', 'replace')
            ban = stored_json(value, str, str, (int, float, type(None)), str)
            if ('bans', field) in self.unsaid or ('bans', field) in self.loading:
                continue  # changed here while the link was down, or since: that holds
            if ban is not None and (ban[2] is None or ban[2] > now):
                what, shown, end, by = ban
                try:
                    self.take_ban(what, None if end is None else end - now, by, shown)
                    kept.add(field)
                    continue
                except ValueError:  # not a network
                    pass
            self.call('HDEL', self.key('bans'), field)  # over, or unreadable
        self.say_unsaid('bans')
        if self.redis_new:
            held = [(str(network), ban) for network, ban in gate.bans.items()]
            held += [('name', ban) for ban in gate.name_bans.values()]
            for what, ban in held:
                if ban.by is not None and ban_field(what, ban.shown) not in kept:
                    self.give_ban(what, ban.shown)

    def got_names(self, reply):
        """Every registered name in Redis: its owner's here too."""
        loading, self.loading = self.loading, None  # the last of load_shared's answers
        if isinstance(reply, RespError):
            return
        known = set()
        for field, value in zip(reply[::2], reply[1::2]):
            field, account = field.decode('utf-8', 'replace'), stored_json(value, str, str)
            unsaid = self.unsaid.get(('names', field), (None, False))
            if ('names', field) in loading:
                known.add(field)  # changed here since the snapshot was asked for
            elif account is not None and not unsaid[1]:
                self.unsaid.pop(('names', field), None)  # Redis's registration holds
                self.learn_name(*account)
                known.add(field)
        self.say_unsaid('names')
        if self.redis_new:
            for key in list(self.server.accounts):
                if key not in known:
                    self.give_name(key)

    def say_unsaid(self, table):
        for field, (again, _) in list(self.unsaid.items()):
            if field[0] == table:
                del self.unsaid[field]
                again()

    def learn_name(self, name, hashed):
        """A name registered on another server.  Someone here who has it
        took it while this server did not know (the link was down, or not
        yet up), without its password: they get a guest name."""
        server, key = self.server, name_key(name)
        if server.accounts.get(key) != (name, hashed):
            holder = server.names.get(key)
            if holder is not None and holder.home is None:
                server.rename_guest(holder)
                server.queue(holder, notice_line('the name %s is registered on another '
                                                 'server: you are %s now' % (name, holder.name)))
            if server.data is not None:
                server.data.people.note('name', name, hashed)
        server.accounts[key] = (name, hashed)

    # Messages for a registered name whose owner is nowhere (/msg): they wait
    # in Redis, in the list CLUSTER:mail:KEY of [STAMP, SENDER, TEXT], for
    # whichever server the owner comes to.

    def leave_mail(self, peer, name, text):
        """Keep a message for name; peer is told if it was kept (at most
        MAIL_PER_NAME wait) once Redis has answered."""
        box = self.key('mail', name_key(name))
        def pushed(waiting):
            if isinstance(waiting, RespError) or peer.close_reason is not None:
                return
            if waiting > MAIL_PER_NAME:
                self.call('LTRIM', box, 0, MAIL_PER_NAME - 1)  # this one goes again
                self.server.mail_refused(peer, name)
            else:
                self.server.mail_kept(peer, name, text)
        if not self.call('RPUSH', box, json.dumps([self.server.stamp().decode(), peer.name,
                                                  text]), answer=pushed):
            self.server.queue(peer, error_line('%s is not here, and the link to the other '
                                               'servers is down: not sent' % name))
            return
        self.call('EXPIRE', box, MAIL_KEEP_SEC)

    def take_mail(self, peer):
        """peer has come in with its registered name: its messages, taken
        out of Redis at once (so no other server hands them out too)."""
        def taken(items):
            if isinstance(items, RespError) or peer.close_reason is not None:
                return
            box = [stored_json(item, str, str, str) for item in items]
            self.server.hand_mail(peer, [(stamp.encode(), sender, text)
                                         for stamp, sender, text in filter(None, box)
                                         if stamp_seconds(stamp)])
        self.call('EVAL', TAKE_MAIL_SCRIPT, 1, self.key('mail', peer.key), answer=taken)

    # The first time linked (and again if that link broke before they all
    # came): each room's history and topic, from Redis, for the rooms that
    # have none here; then the bus, from where they end.

    def load_rooms(self):
        self.commands.call(self.got_topics, 'HGETALL', self.key('topics'))
        self.commands.call(self.got_rooms, 'HVALS', self.key('room-names'))

    def got_topics(self, reply):
        if isinstance(reply, RespError):  # not a hash (damaged): none kept
            return
        for value in reply[1::2]:
            name, text, setter = stored_json(value, str, str, str) or ('', '', '')
            if name_problem(name) is None:
                room = self.server.room_named(name)
                room.topic = room.topic or text

    def got_rooms(self, names):
        if isinstance(names, RespError):  # not a hash (damaged): none kept
            names = []
        names = [name.decode('utf-8', 'replace') for name in names]
        names = [name for name in names if name_problem(name) is None]
        waiting = [len(names)]
        def got(entries, name):
            self.got_history(name, entries)
            waiting[0] -= 1
            if not waiting[0]:
                self.rooms_loaded()
        for name in names:
            self.commands.call(lambda entries, name=name: got(entries, name), 'XREVRANGE',
                               self.key('history', name_key(name)), '+', '-',
                               'COUNT', HISTORY_MAX_LINES)
        if not names:
            self.rooms_loaded()

    def rooms_loaded(self):
        """The rooms' history and topics are here: read the bus on from them."""
        self.rooms_read, self.histories = True, None
        self.server.keep_empty_rooms()
        self.follow_bus()
        self.say_linked()

    def say_linked(self):
        """Log that this server is linked, once what it read is taken."""
        self.call('PING', answer=lambda _: self.server.log(
            'link: linked through Redis at %s:%d as %s, cluster %s' % (
                self.url.host, self.url.port, self.id, self.cluster)))

    def got_history(self, name, entries):
        """A room's lines from Redis, newest first: those said before the
        bus entry this server reads on from (the rest come on the bus),
        before any said here while a first link was down."""
        room = self.server.room_named(name)
        if room.key in self.histories or isinstance(entries, RespError):  # (not a stream)
            return
        self.histories.add(room.key)
        older = []
        for _, fields in reversed(entries):
            said = dict(zip(fields[::2], fields[1::2]))
            if stream_id(said[b'b']) <= stream_id(self.last_id):
                _, _, stamp, _, lines = said_fields(said[b'e'].split(b'\t', 2)[2])
                older.append((stamp, lines))
        room.history.add_older(older)

    def take_guest_numbers(self):
        """Guest names are numbered cluster-wide, a block at a time."""
        def taken(reply):
            if isinstance(reply, int):
                self.guests = iter(range(reply - LINK_GUEST_BLOCK + 1, reply + 1))
                self.guests_left = LINK_GUEST_BLOCK
        self.commands.call(taken, 'INCRBY', self.cluster + ':guests', LINK_GUEST_BLOCK)

    def guest_number(self):
        """A number for a guest name; None to use the server's own count."""
        self.guests_left -= 1
        if self.guests_left == LINK_GUEST_BLOCK // 2 and self.up:
            try:
                self.take_guest_numbers()
            except RespFailure as exc:
                self.fail(exc)
        return next(self.guests, None)

    def state(self):
        """Everyone on this server, for the others."""
        return [self.person_state(peer) for peer in self.server.names.values()
                if peer.home is None and peer.room is not None]

    @staticmethod
    def person_state(peer):
        """[NAME, ROOM, CLAIMED, AWAY, OPERATOR, LOST]: one in a state event."""
        return [peer.name, peer.room.name, peer.claimed, peer.away or '', peer.operator,
                peer.lost_at is not None]

    def beat(self, _=None):
        """Say this server lives; take servers long unheard for dead; and
        start again if Redis has left a command unanswered too long (the
        connection that hears the bus is asked a PING at every beat, so it
        is answered that often)."""
        self.later(LINK_BEAT_SEC, self.beat)
        now = time.monotonic()
        for connection in (self.commands, self.reader):
            if (connection is not None and connection.sock is not None and connection.waiting
                    and now - connection.answered_at > LINK_ANSWER_SEC):
                self.fail(OSError(errno.ETIMEDOUT, 'no answer for %s' % duration(
                    now - connection.answered_at)))
                return
        if not self.up:
            return
        self.publish('beat')
        self.reader.call(None, 'PING')
        self.call('GET', self.key('epoch'), answer=self.check_epoch)
        for origin, heard in list(self.heard.items()):
            if now - heard > LINK_DEAD_SEC and origin not in self.dead:
                people = list(self.people.get(origin, {}).values())
                self.server.log('link: server %s unheard for %s: its %s lost' % (
                    origin, duration(now - heard), plural(len(people), 'person')))
                if not people:  # nothing to keep of it (if only cut off, it says
                    self.forget(origin)  # hello and its state when linked again)
                    continue
                self.dead.add(origin)
                for mirror in people:
                    self.mirror_lost(mirror)

    def forget(self, origin):
        """A server gone, and nothing left of it here: not even its id (a
        server is a new one at every start, so ids would pile up)."""
        for table in (self.people, self.heard):
            table.pop(origin, None)
        self.dead.discard(origin)

    # Receiving -----------------------------------------------------------------

    def on_message(self, payload):
        """An event from the bus (see the format above)."""
        origin, kind, rest = (payload.split(b'\t', 2) + [b'', b''])[:3]
        origin = origin.decode('ascii', 'replace')
        if origin != self.id:
            self.heard[origin] = time.monotonic()
        if origin in self.dead and origin != self.id:  # it was only cut off
            self.dead.discard(origin)
            self.publish('hello')  # its state comes again
        kind = kind.decode('ascii', 'replace')
        if kind not in BUS_EVENTS:
            return  # a newer server's event: not for us
        handler = getattr(self, 'on_' + kind)  # (every kind has one: TestResp checks)
        fields = rest if kind in ('say', 'to') else rest.decode('utf-8', 'replace')
        try:
            handler(origin, fields)
        except Exception as exc:  # a bad event, or a bug: never the server's end
            self.server.log('link: cannot take a %s event from %s: %r' % (kind, origin, exc))

    def mirror_of(self, origin, name):
        """The mirror of name on server origin, or None.  A name whose claim
        lost here (a clash) is its person's old name's mirror, until its
        server renames it."""
        peer = self.server.names.get(name_key(name))
        if peer is not None and peer.home == origin:
            return peer
        peer = self.aliases.get((origin, name_key(name)))
        return peer if peer is not None and self.server.names.get(peer.key) is peer else None

    def on_say(self, origin, fields):
        number, room_key, stamp, sender, lines = said_fields(fields)
        if self.came_back(origin, number) is not None:  # heard as it came back, or
            return  # as it was lost (hear_said)
        room = self.server.rooms.get(room_key.decode('utf-8', 'replace'))
        if room is not None:
            mirror = self.mirror_of(origin, sender.decode('utf-8', 'replace'))
            self.mark(room)
            room.hear(mirror if mirror is not None and mirror.room is room else None,
                      lines, stamp)

    # Sessions that resume on another server ------------------------------------

    def hear_said(self, room, sender, stamp, lines):
        """Lines said here, back from Redis (or not coming back): heard
        in their room (made again if it went meanwhile)."""
        self.said_bytes -= len(lines)
        room = self.server.room_named(room.name)
        if self.up:
            self.mark(room)
        room.hear(sender if sender.room is room else None, lines, stamp)

    def mark(self, room):
        """room's next line is the bus entry just read (Link.missed)."""
        if self.server.resume_for:
            room.bus_marks.append((stream_id(self.last_id), room.seq))

    def note_sessions(self):
        for peer in list(self.server.names.values()):
            if peer.home is None and peer.session is not None:
                self.note_session(peer)

    def note_session(self, peer):
        """Where peer's session is, for whichever server it resumes on."""
        session = peer.session
        key = self.key('session', session.digest)
        since = stream_id(min(session.bus_mark, session.private_mark, key=stream_id))
        spans = [b' '.join(((other.name if last is None else name).encode(), first,
                            last or b'+'))
                 for other, name, first, last in session.ignore_spans
                 if last is None or stream_id(last) > since]  # (older: counted by no one)
        self.call('HSET', key, 'name', peer.name, 'server', self.id,
                  'mark', session.bus_mark, 'private_mark', session.private_mark,
                  'claimed', repr(peer.claimed),
                  'ignoring', '\t'.join(other.name for other in peer.ignoring),
                  'ignored', b'\t'.join(spans), 'muted', peer.muted or '',
                  'lost', session.lost_mark or '', 'apart', 'yes' if session.apart else '')
        self.call('EXPIRE', key, LINK_SESSION_KEEP_SEC)

    def end_session(self, digest):
        if not self.call('DEL', self.key('session', digest)):
            self.ended.add(digest)  # when linked again

    def find_session(self, peer, digest, heard, heard_privately):
        """/resume of a session this server does not have: Redis may know
        it, of another server.  peer's input waits for the answer.  heard
        is None if the client gave no counts (typed by hand)."""
        self.server.pause(peer, LINK_CONNECT_SEC)  # reads on at the answer, if not before
        self.resuming.add(peer)
        def found(record):
            self.resuming.discard(peer)
            if peer.sock is None or peer.close_reason is not None:
                return
            session = session_record(record)
            mirror = session and self.mirror_of(session.server, session.name)
            if (mirror is None or self.server.gate.name_banned(mirror.key)
                    or repr(mirror.claimed) != session.claimed):
                self.server.refuse_resume(peer)  # (the claim: not someone since called so)
            else:
                self.people.get(mirror.home, {}).pop(mirror.key, None)
                self.ignore_again(mirror, session.ignoring)
                mirror.muted = session.muted
                mark, private_mark, counts = session.mark, session.private_mark, (
                    heard, heard_privately)
                if heard is None or session.apart:  # no counts, or not of the bus's
                    counts = (0, 0)  # lines: from the loss on, or all (twice, not lost)
                    if session.lost is not None:
                        mark = private_mark = session.lost
                missed, gone = self.missed(mirror, mark, counts[0], private_mark, counts[1],
                                           session.ignored)
                self.server.resume_from_elsewhere(peer, mirror, missed, gone)
                self.call('DEL', self.key('session', digest))  # its new token replaces it
            self.server.guarded(self.server.resume, peer)
        try:
            self.commands.call(found, 'HGETALL', self.key('session', digest))
        except RespFailure as exc:
            self.fail(exc)

    def ignore_again(self, mirror, names):
        """Whom a person resuming here ignored on its old server (names), of
        those still here; no one else (it may have been here before, and
        stopped since)."""
        for other in mirror.ignoring:
            other.ignored_by.discard(mirror)
        mirror.ignoring.clear()
        people = self.server.names
        for name in names:
            other = people.get(name_key(name))
            if other is not None and other is not mirror:
                mirror.ignoring.add(other)
                other.ignored_by.add(mirror)

    def missed(self, mirror, mark, heard, private_mark, heard_privately, spans):
        """The public lines of mirror's room since bus entry mark, less its
        own and less the first heard (which its client had), then the
        private messages to it since bus entry private_mark, less the first
        heard_privately; neither those of people it ignored then (spans:
        ignore_spans); at most half a backlog cap of the newest; and a note
        if some are gone."""
        room, server = mirror.room, self.server
        marks = room.bus_marks
        def after(entry):  # the number of the room's first line after bus entry
            index = bisect.bisect_right(marks, (entry, float('inf')))
            return marks[index][1] if index < len(marks) else room.seq
        index = bisect.bisect_right(marks, (mark, float('inf')))
        first, own = after(mark), said_by(mirror.name)
        unheard = [(said_by(name), after(begun),  # by line number
                    float('inf') if ended is None else after(ended))
                   for name, begun, ended in spans]
        lines = []
        for start, sender, blob, _ in room.said:
            for number, line in enumerate(blob.splitlines(True), start):
                if (number >= first and sender is not mirror and line.startswith((b'<', b'* '))
                        and not line.startswith(own) and not any(
                            begun <= number < ended and line.startswith(said)
                            for said, begun, ended in unheard)):
                    lines.append(line)
        lines = lines[heard:]
        privately = self.private_for.pop(mirror, None) or KeptPrivately(0)
        unheard = [(private_line(name, '')[:-1], begun, ended) for name, begun, ended in spans]
        lines += [line for entry, line in privately.lines if entry > private_mark and not any(
            begun < entry and (ended is None or entry <= ended) and line.startswith(sender)
            for sender, begun, ended in unheard)][heard_privately:]
        kept, size = len(lines), 0
        while kept and size + len(lines[kept - 1]) <= server.max_backlog // RESUME_SHARE:
            kept -= 1
            size += len(lines[kept])
        gone = (kept or stream_id(self.first_id) > private_mark  # (<= mark: it is older)
                or privately.forgot_after(private_mark)
                or (index == 0 and marks and marks[0][0] > mark and room.said_from > 0))
        return lines[kept:], ' (some earlier ones are gone)' if gone else ''

    def on_moved(self, origin, fields):
        """name resumed on server origin: here it is one of origin's now.  A
        server that did not know it (linked after its old server died, or
        that forgot it) takes it as if from origin's state."""
        name, claimed, state = (fields.split('\t', 2) + [''])[:3]  # (no state: older)
        if origin == self.id:
            return
        holder = self.server.names.get(name_key(name))
        if holder is None or repr(holder.claimed) != claimed:  # not this person
            if state:
                self.take_state(origin, json.loads(state))
            return
        if holder.home is None:  # its old connection was here
            self.server.hand_over(holder, origin)
        self.private_for.pop(holder, None)  # its new server has them
        self.people.get(holder.home, {}).pop(holder.key, None)
        holder.home = origin
        self.people.setdefault(origin, {})[holder.key] = holder
        self.server.back(holder)

    def on_topic(self, origin, fields):
        number, name, setter, text = fields.split('\t', 3)
        if self.came_back(origin, number) is not None:
            return  # this server's own: set as it came back or was lost (Link.topic)
        if name_problem(name) is None:
            self.server.room_named(name).set_topic_here(text, setter)

    def on_in(self, origin, fields):
        name, room_name, claimed = fields.split('\t')
        self.on_claim(origin, name, room_name, float(claimed))

    def on_nick(self, origin, fields):
        old, new, room_name, claimed = fields.split('\t')
        if origin == self.id:
            self.confirmed(new)
            return
        mirror = self.mirror_of(origin, old)
        if mirror is None:
            self.on_claim(origin, new, room_name, float(claimed))
        elif self.winner(origin, new, mirror):
            self.rename_mirror(mirror, new)
            mirror.claimed = float(claimed)
        else:  # it keeps its old name here until its server renames it
            self.aliases[(origin, name_key(new))] = mirror

    def confirmed(self, name):
        self.unconfirmed.pop(name_key(name), None)

    def winner(self, origin, name, mirror=None):
        """True if origin's claim of name, just come in, stands: no one has
        it (but mirror, its claimer), or only a person here whose own claim
        has not come back yet (and so came later), who takes a guest name."""
        key = name_key(name)
        holder = self.server.names.get(key)
        if holder is None or holder is mirror:
            return True
        if holder.home is None and self.unconfirmed.get(key) is holder:
            self.yield_name(holder)
            return True
        return False

    def yield_name(self, peer):
        """A clash settled against peer here: a guest name, and why."""
        self.unconfirmed.pop(peer.key, None)
        name = peer.name
        self.server.rename_guest(peer)
        self.server.queue(peer, notice_line('%s took the name %s on another server first: '
                                            'you are %s now' % (name, name, peer.name)))

    def on_claim(self, origin, name, room_name, claimed, state=None):
        """name is in room_name on server origin: came, moved, or is there
        as its state says (state: away, operator, lost)."""
        if origin == self.id:
            self.confirmed(name)
            return
        mirror = self.mirror_of(origin, name)
        if mirror is None:
            if not self.winner(origin, name):
                return
            mirror = self.server.add_mirror(origin, name, room_name, claimed)
            self.people.setdefault(origin, {})[mirror.key] = mirror
        else:
            if mirror.key != name_key(name) and self.winner(origin, name, mirror):
                self.rename_mirror(mirror, name)  # known by an alias until now
            if name_problem(room_name) is None:
                self.server.move_mirror(mirror, room_name)
        mirror.claimed = claimed
        if state is not None:
            away, mirror.operator, lost = state
            mirror.away = away or None
            mirror.room.roster = None
            if lost and mirror.lost_at is None:
                self.mirror_lost(mirror)
            elif not lost:
                self.server.back(mirror)

    def rename_mirror(self, mirror, name):
        """A person on another server has a new name here."""
        people = self.people.setdefault(mirror.home, {})
        people.pop(mirror.key, None)
        for alias in [alias for alias, peer in self.aliases.items() if peer is mirror]:
            del self.aliases[alias]
        self.server.rename_now(mirror, name)
        people[mirror.key] = mirror

    def on_out(self, origin, fields):
        name, reason = fields.split('\t', 1)
        mirror = self.mirror_of(origin, name)
        if mirror is not None:
            self.drop_mirror(mirror, reason)

    def drop_mirror(self, mirror, reason):
        people = self.people.get(mirror.home, {})
        people.pop(mirror.key, None)
        self.private_for.pop(mirror, None)
        for alias in [alias for alias, peer in self.aliases.items() if peer is mirror]:
            del self.aliases[alias]
        if not people and mirror.home in self.dead:  # nothing left of a dead server
            self.forget(mirror.home)
        self.server.drop_mirror(mirror, reason)

    def on_lost(self, origin, name):
        mirror = self.mirror_of(origin, name)
        if mirror is not None and mirror.lost_at is None:
            self.mirror_lost(mirror)

    def mirror_lost(self, mirror):
        """A person on another server lost the connection, or that server
        is gone: told as here, and waits --resume-for to come back."""
        if mirror.lost_at is not None or self.server.names.get(mirror.key) is not mirror:
            return
        mirror.lost_at = time.monotonic()
        mirror.room.departures.append((mirror.name, LOST_NOTE))
        mirror.room.announce_soon()
        mirror.room.roster = None
        self.later(self.server.resume_for, self.expire_mirror, mirror)

    def expire_mirror(self, mirror):
        if (mirror.home is not None and mirror.lost_at is not None
                and self.server.names.get(mirror.key) is mirror
                and time.monotonic() - mirror.lost_at >= self.server.resume_for - 0.01):
            self.drop_mirror(mirror, 'connection lost')

    def on_back(self, origin, name):
        mirror = self.mirror_of(origin, name)
        if mirror is not None:
            self.server.back(mirror)

    def on_away(self, origin, fields):
        name, reason = fields.split('\t', 1)
        mirror = self.mirror_of(origin, name)
        if mirror is not None:
            mirror.away = reason or None
            mirror.room.roster = None

    def on_op(self, origin, name):
        mirror = self.mirror_of(origin, name)
        if mirror is not None:
            mirror.operator = True

    def on_pm(self, origin, fields):
        number, sender, name, text = fields.split('\t', 3)
        self.came_back(origin, number)
        recipient = self.server.names.get(name_key(name))
        if recipient is None:
            return
        if recipient.home is not None:  # for a resume here
            self.keep_private(recipient, sender, text)
            return
        if origin != self.id:
            source = self.mirror_of(origin, sender)
        else:  # sent here while recipient was on another server: it resumed here since
            source = self.server.names.get(name_key(sender))
            source = source if source is not None and source.home is None else None
        if source is not None:
            self.server.hear_private(source, recipient, text)

    def on_heard(self, origin, fields):
        """A private message between two people of server origin, which it
        delivered itself: kept, in case its recipient resumes here."""
        sender, name, text = fields.split('\t', 2)
        recipient = self.server.names.get(name_key(name))
        if recipient is not None and recipient.home == origin:
            self.keep_private(recipient, sender, text)

    def keep_private(self, mirror, sender, text):
        if self.server.resume_for:
            kept = self.private_for.get(mirror)
            if kept is None:
                kept = self.private_for[mirror] = KeptPrivately(
                    self.server.max_backlog // RESUME_SHARE)  # what a resume can send
            kept.add(stream_id(self.last_id), private_line(sender, text))

    def on_to(self, origin, fields):
        name, lines = fields.split(b'\t', 1)
        peer = self.server.names.get(name_key(name.decode('utf-8', 'replace')))
        if peer is not None and peer.home is None:
            self.server.queue(peer, lines)

    def on_act(self, origin, fields):
        target, by, command = fields.split('\t', 2)
        peer = self.server.names.get(name_key(target))
        if peer is None or peer.home is not None:
            return
        operator = self.mirror_of(origin, by)
        if operator is None:  # the other server's console
            operator = Peer(None, 'console', 0)
            operator.name, operator.home = by, origin
        word, _, argument = command.partition(' ')
        if 'cmd_' + word in self.server.FORWARDED:
            getattr(self.server, 'cmd_' + word)(operator, argument)

    def on_ban(self, origin, fields):
        """Another server's operator banned an address, or a person's name."""
        what, seconds, by, shown = fields.split('\t', 3)
        self.heard_change('bans', ban_field(what, shown))
        if origin != self.id:
            self.take_ban(what, float(seconds) if seconds else None, by, shown)

    def take_ban(self, what, seconds, by, shown):
        """A ban made on another server: an address's connections here
        close, and so does the holder of a banned name, if here (one that
        took it while this server did not know of the ban)."""
        gate = self.server.gate
        if what == 'name':
            holder = self.server.names.get(name_key(shown))
            if holder is not None and holder.home is None and holder.sock is not None:
                gate.ban_person(holder, seconds, by)
            else:
                gate.name_bans[name_key(shown)] = Ban(shown, seconds, by, True)
        else:
            self.server.gate.ban(ipaddress.ip_network(what), shown, seconds, by)

    def on_unban(self, origin, what):
        self.heard_change('bans', unban_field(what))
        if origin != self.id:
            self.server.gate.lift(what)

    def heard_change(self, table, field):
        """A ban, unban, registration or unregistration on the bus while
        the shared hashes are read (load_shared): it is newer than what the
        read may hold for it, which got_bans and got_names pass over."""
        if self.loading is not None:
            self.loading.add((table, field))

    def on_name(self, origin, fields):
        """A name registered on another server (its password's hash)."""
        name, hashed = fields.split('\t')
        self.heard_change('names', name_key(name))
        if origin != self.id:
            self.learn_name(name, hashed)

    def on_unname(self, origin, name):
        self.heard_change('names', name_key(name))
        server = self.server
        if origin != self.id and server.accounts.pop(name_key(name), None) is not None:
            server.mail.pop(name_key(name), None)
            if server.data is not None:
                server.data.people.note('unname', name)

    def on_wall(self, origin, fields):
        number, line = fields.split('\t', 1)
        if self.came_back(origin, number) is not False:  # (else told here already)
            self.server.wall_here(line.encode('utf-8') + b'\n')

    def on_hello(self, origin, _):
        if origin != self.id:
            self.publish('state', json.dumps(self.state()))

    def on_state(self, origin, fields):
        """Everyone on server origin now: settle each name against the
        people here (the earlier claim keeps it), and forget those of its
        people who are not there any more."""
        if origin == self.id:
            return
        listed = {self.take_state(origin, person) for person in json.loads(fields)}
        for key, mirror in list(self.people.get(origin, {}).items()):
            if key not in listed:
                self.drop_mirror(mirror, 'left')

    def take_state(self, origin, person):
        """One person of server origin (person_state): the earlier claim
        keeps the name.  Its name's key."""
        name, room_name, claimed, away, operator, lost = person
        holder = self.server.names.get(name_key(name))
        if holder is not None and holder.home is None and (
                (claimed, origin) < (holder.claimed, self.id)):
            self.yield_name(holder)  # it had the name before this one did
        self.on_claim(origin, name, room_name, claimed, (away, operator, lost))
        return name_key(name)

    def on_beat(self, origin, _):
        """Nothing more to do: on_message noted when origin was heard."""

    def on_bye(self, origin, _):
        for mirror in list(self.people.get(origin, {}).values()):
            self.drop_mirror(mirror, 'its server stopped')
        self.forget(origin)


# --- The web page --------------------------------------------------------------

# The browser client: one document, no external resource.  Its script and
# style are inline, allowed by their hashes in the Content-Security-Policy
# (page_csp); it holds no backslash, so this plain string is the page.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, interactive-widget=resizes-content">
<meta name="color-scheme" content="light dark">
<title>chat</title>
<link rel="icon" href="data:,">
<style>
/* Light and dark colours; each name colour has 4.5:1 contrast or more on its background. */
:root {
  --bg: #fff; --fg: #1d1f23; --dim: #5f6368; --rule: #d0d4da; --panel: #f3f4f6;
  --mark: #fff1b8; --pm: #f1e9ff; --error: #b3261e;
  --n31: #b3261e; --n32: #1b7a2a; --n33: #806400; --n34: #1f5fbf; --n35: #9c2f96; --n36: #00756a;
  --n91: #c2410c; --n92: #4b7a0f; --n93: #925500; --n94: #4545c8; --n95: #be185d; --n96: #0369a1;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #16181d; --fg: #e6e8eb; --dim: #9aa0a6; --rule: #343842; --panel: #20232a;
    --mark: #4a3f10; --pm: #2e2542; --error: #ff8a80;
    --n31: #ff8a80; --n32: #7ee787; --n33: #e3c84b; --n34: #79b8ff; --n35: #f08de6; --n36: #5fd7d7;
    --n91: #ffab70; --n92: #b5e550; --n93: #ffd866; --n94: #a5a5ff; --n95: #ff79c6; --n96: #67e8f9;
  }
}
.n31 { color: var(--n31); } .n32 { color: var(--n32); } .n33 { color: var(--n33); }
.n34 { color: var(--n34); } .n35 { color: var(--n35); } .n36 { color: var(--n36); }
.n91 { color: var(--n91); } .n92 { color: var(--n92); } .n93 { color: var(--n93); }
.n94 { color: var(--n94); } .n95 { color: var(--n95); } .n96 { color: var(--n96); }

/* A column as tall as the visible screen, of which only the log scrolls:
   100dvh shrinks when a phone's keyboard opens, so the input stays above it. */
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body {
  display: flex; flex-direction: column; height: 100vh; height: 100dvh; margin: 0;
  background: var(--bg); color: var(--fg); font: 16px/1.45 system-ui, sans-serif;
}
button, input {
  min-height: 44px; padding: 0 .75rem; font: inherit; color: inherit;
  background: var(--panel); border: 1px solid var(--rule); border-radius: 6px;
}
input { min-width: 0; background: var(--bg); }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
header, #banner, .panel, #send-form {
  flex: none; display: flex; flex-wrap: wrap; align-items: center; gap: .25rem .75rem;
  padding: .4rem .75rem; border-bottom: 1px solid var(--rule);
}
h1 { margin: 0; font-size: 1.15rem; }
#security { font-size: .85rem; color: var(--dim); }
#security.plain { color: var(--error); }
#topic { flex: 1 1 12rem; margin: 0; color: var(--dim); overflow-wrap: anywhere; }
#notify-button { margin-left: auto; }
#banner { background: var(--mark); }
.panel { background: var(--panel); }
.panel input { flex: 1 1 10rem; }
.panel p { flex-basis: 100%; margin: 0; color: var(--error); }

main { flex: 1; min-height: 0; display: flex; }
#log { flex: 1; min-width: 0; overflow-y: auto; margin: 0; padding: .5rem .75rem; list-style: none; }
#people { flex: none; width: 13rem; overflow-y: auto; padding: 0 .75rem; border-left: 1px solid var(--rule); }
summary { min-height: 44px; display: flex; align-items: center; cursor: pointer; font-weight: 600; }
summary::before { content: "▸"; width: 1.2em; }
[open] > summary::before { content: "▾"; }
#members { list-style: none; margin: 0; padding: 0; overflow-wrap: anywhere; }
#members .away, #members .more { color: var(--dim); }
#members .me .who { text-decoration: underline; }

/* A line of the log; pre-wrap keeps the spaces people typed. */
.line { padding: .1rem .25rem; white-space: pre-wrap; overflow-wrap: anywhere; border-radius: 4px; }
.time { color: var(--dim); font-size: .8rem; font-variant-numeric: tabular-nums; }
.who { font-weight: 600; }
.action { font-style: italic; }
.notice, .private .label, .replay { color: var(--dim); }
.error { color: var(--error); }
.private { background: var(--pm); }
.mention { background: var(--mark); }
mark { background: none; color: inherit; font-weight: 700; text-decoration: underline; }

#send-form { border: 0; border-top: 1px solid var(--rule); padding-bottom: max(.4rem, env(safe-area-inset-bottom)); }
#line { flex: 1; }

/* A phone: the member list folds into a bar above the log. */
@media (max-width: 40rem) {
  main { flex-direction: column; }
  #people { order: -1; width: auto; max-height: 40%; border: 0; border-bottom: 1px solid var(--rule); }
  #topic { order: 1; flex-basis: 100%; }
}
</style>
</head>
<body>
<header>
  <h1 id="room">chat</h1>
  <span id="security"></span>
  <p id="topic" hidden></p>
  <button id="notify-button" type="button" aria-label="Notify me of mentions and private messages" hidden>Notify me</button>
</header>
<div id="banner" role="status" hidden>
  <span id="banner-text"></span>
  <button id="retry-button" type="button">Connect now</button>
</div>
<form id="name-form" class="panel" hidden>
  <label for="name-input">Your name</label>
  <input id="name-input" autocomplete="nickname" autocapitalize="off" spellcheck="false" required>
  <button type="submit">Join</button>
  <button id="guest-button" type="button">Continue as guest</button>
  <p id="name-hint" aria-live="polite"></p>
</form>
<form id="password-form" class="panel" hidden>
  <label for="password-input">Room password</label>
  <input id="password-input" type="password" autocomplete="off" required>
  <button type="submit">Enter</button>
</form>
<main>
  <ol id="log" role="log" aria-live="polite" aria-label="Messages" tabindex="0"></ol>
  <details id="people" open>
    <summary id="people-heading">Online</summary>
    <ul id="members" aria-labelledby="people-heading"></ul>
  </details>
</main>
<form id="send-form" hidden>
  <label for="line" class="sr-only">Message, or a command such as /help</label>
  <input id="line" autocomplete="off" enterkeyhint="send" placeholder="Message, or /help">
  <button type="submit">Send</button>
</form>
<script>
'use strict';
// The browser client of chat.py: the terminal client's line protocol over
// a WebSocket at /ws, one text frame per line each way (README "Protocol").
// Text from the network reaches the page only as text nodes, never markup.
// This file holds no backslash, so chat.py keeps it in a plain Python
// string unchanged; BACKSLASH serves the one pattern that needs one.

// --- Settings ---

const MAX_LINE_BYTES = 4096;       // the server's limit, UTF-8, newline excluded
const BACKOFF_MS = [1000, 2000, 4000, 8000, 16000, 30000];   // the last repeats
const JITTER = 0.2;                // +-20 %: a restarted server is not hit all at once
const MAX_LOG_LINES = 2000;        // older lines go: a tab open for days stays light
const NAME_KEY = 'chat.name';      // localStorage: the name asked for on connect
const PALETTE = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96];   // the terminal's
// Test hook: window.CHAT_BACKOFF_MS = [100, 200] shortens the reconnect
// waits; it is read at each drop, so it may be set any time before one.

const BACKSLASH = String.fromCharCode(92);
const ENCODER = new TextEncoder();
const $ = id => document.getElementById(id);
const log = $('log'), line = $('line');

// --- State ---

let socket = null, isOpen = false;   // the current WebSocket, and whether it is open
let reconnectTimer = null;
let attempt = 0;              // drops since the server last let us in
let stopReason = null;        // goodbye or a refusal: no reconnect
let chosen = storedName();    // the name we ask for on connect
let name = null;              // ours, as the server last said
let room = null, topic = '';
const members = new Map();    // name -> away, in our room
let memberTotal = 0;          // the server's count: a big room lists only some
let replaying = 0;            // history lines still due after "Last N messages:"
let greetAgain = false;       // a password prompt swallowed the greeting
let unechoed = [];            // our lines sent before we knew our name
let mentionPattern = null;    // our name as a whole word
let unread = 0;               // lines that came while the tab was hidden
let token = null, seen = 0;   // our resume token, and the lines received since it,
let heard = 0;                // and of them public lines of our room since we entered it
let privately = 0;            // and private messages since the token (for another server)
let resuming = false;         // we sent /resume: a token that comes now is a new one
let roomBeforeDrop = null;    // to go back to if we cannot resume
let held = null;              // while resuming, what the connection was sent as a newcomer
let stickToEnd = true;        // the log follows new lines unless scrolled up
let composing = false;        // an IME is composing in the input line
const sent = [];              // lines sent, for Up and Down
let recallAt = 0, draft = '';

// --- Helpers ---

function el(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// HH:MM, with the date for a day other than today.
function clock(when) {
  const pad = n => String(n).padStart(2, '0');
  const time = pad(when.getHours()) + ':' + pad(when.getMinutes());
  if (when.toDateString() === new Date().toDateString()) return time;
  return when.getFullYear() + '-' + pad(when.getMonth() + 1) + '-' + pad(when.getDate()) + ' ' + time;
}

// A replayed line starts "[2026-12-01T18:15:03Z] ": when it was said, in UTC.
const SECRET_LINE = /^[/](pass|op|register) |^[/]nick [^ ]+ [^ ]/i;   // not kept for Up
const STAMP = /^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$/;
function saidAt(text) {
  const stamp = text.slice(1, 21);
  return text[0] === '[' && text.slice(21, 23) === '] ' && STAMP.test(stamp) ? new Date(stamp) : null;
}

// zlib's CRC-32, so that a name has the colour the terminal client gives it.
const CRC_TABLE = Array.from({length: 256}, (_, n) => {
  for (let k = 0; k < 8; k++) n = n & 1 ? 0xEDB88320 ^ (n >>> 1) : n >>> 1;
  return n >>> 0;
});
function crc32(bytes) {
  let crc = 0xFFFFFFFF;
  for (const byte of bytes) crc = CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >>> 8);
  return (crc ^ 0xFFFFFFFF) >>> 0;
}

// The server keys names by NFKC(NFKC(name).casefold()); toLowerCase stands in for casefold.
function nameColour(who) {
  const key = who.normalize('NFKC').toLowerCase().normalize('NFKC');
  return 'n' + PALETTE[crc32(ENCODER.encode(key)) % PALETTE.length];
}

// localStorage may be off (private windows, policies): then the name lives in memory.
function storedName() {
  try { return localStorage.getItem(NAME_KEY); } catch (error) { return null; }
}
function remember(who) {
  chosen = who;
  try {
    if (who) localStorage.setItem(NAME_KEY, who); else localStorage.removeItem(NAME_KEY);
  } catch (error) { /* in memory only */ }
}

// --- Connection ---

function connect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
  socket = ws;
  setBanner(attempt ? 'reconnecting…' : 'connecting…');
  // Events of a socket given up on are ignored.
  ws.addEventListener('open', () => ws === socket && onOpen());
  ws.addEventListener('message', event => ws === socket && onLine(String(event.data)));
  ws.addEventListener('close', () => ws === socket && onClose());
}

// The one place that decides what a new connection says first: after a
// drop, resume (the server sends what we missed, once), else greet.
function onOpen() {
  isOpen = true;
  replaying = 0;
  greetAgain = false;
  setBanner(null);
  if (attempt) showLocal('notice', 'connected again');
  resuming = Boolean(token);
  held = token ? [] : null;
  if (token) send('/resume ' + token + ' ' + seen + ' ' + heard + ' ' + privately);
  else greet();
}

// Ask for our name, and after a reconnect go back to our room.
function greet() {
  const target = roomBeforeDrop || room;
  roomBeforeDrop = null;
  if (chosen) send('/nick ' + chosen);
  if (target && target !== '#lobby') send('/join ' + target);
}

function onClose() {
  if (isOpen && !stopReason) showLocal('error', 'connection lost');
  roomBeforeDrop = roomBeforeDrop || room;
  held = null;
  socket = null;
  isOpen = false;
  $('password-form').hidden = true;
  if (stopReason) setBanner('Disconnected: ' + stopReason, 'Connect again');
  else scheduleReconnect();
}

function scheduleReconnect() {
  const steps = window.CHAT_BACKOFF_MS || BACKOFF_MS;
  const delay = steps[Math.min(attempt, steps.length - 1)] * (1 - JITTER + 2 * JITTER * Math.random());
  attempt += 1;
  setBanner('reconnecting… (next try in ' + Math.ceil(delay / 1000) + ' s)', 'Connect now');
  reconnectTimer = setTimeout(connect, delay);
}

function setBanner(text, buttonLabel) {
  $('banner').hidden = !text;
  $('banner-text').textContent = text || '';
  $('retry-button').textContent = buttonLabel || '';
  $('retry-button').hidden = !buttonLabel;
}

function send(text) {
  if (!isOpen) return false;
  socket.send(text);
  return true;
}

// --- Lines from the server ---

// A line's kind, by its marker, and its parts: {kind, name, body}.
function classify(text) {
  let head = /^<([^ <>]+)> /.exec(text);
  if (head) return {kind: 'public', name: head[1], body: text.slice(head[0].length)};
  head = /^[*] ([^ ]+) /.exec(text);
  if (head) return {kind: 'action', name: head[1], body: text.slice(head[0].length)};
  head = /^[[]PM (from|to) ([^ ]+?)] /.exec(text);   // a lone ] matches itself
  if (head) return {kind: 'pm-' + head[1], name: head[2], body: text.slice(head[0].length)};
  const kind = {'-!- ': 'notice', '!!! ': 'error'}[text.slice(0, 4)];
  return kind ? {kind, body: text.slice(4)} : {kind: 'plain', body: text};
}

function onLine(text) {
  if (held) {   // a WebSocket is let in as a newcomer, until the resume says otherwise
    if (/^-!- You are back as /.test(text)) held = null;   // those lines are moot
    else if (text.startsWith('!!! cannot resume')) {
      const lines = held;
      held = null;
      lines.forEach(onLine);   // we are that newcomer after all
    } else {
      held.push(text);
      return;
    }
  }
  const resume = /^-!- To resume after a lost connection: [/]resume ([^ ]+)$/.exec(text);
  if (resume) {   // counted from here; not shown: the page resumes by itself
    token = resume[1];
    seen = heard = privately = 0;
    resuming = false;
    return;
  }
  if (token) seen += 1;
  if (/^(<[^ ]+> |[*] [^ ]+ )/.test(text)) heard += 1;   // what a restart keeps
  else if (/^-!- You are in #/.test(text)) heard = 0;
  else if (text.startsWith('[PM from ')) privately += 1;
  if (text.startsWith('!!! cannot resume')) {
    if (resuming) token = null;   // else the guest we came in as has a token already
    resuming = false;
    greet();
  }
  const when = saidAt(text);
  if (when) text = text.slice(22);
  const parts = classify(text);
  const replayed = replaying > 0 || Boolean(when);   // history: said before we came
  if (replaying > 0) replaying -= 1;
  else if (!replayed) learn(parts);
  const item = render(parts.kind, parts, when);
  const mention = !replayed && mentionsMe(parts);
  item.classList.toggle('replay', replayed);
  item.classList.toggle('mention', mention);
  appendLine(item, false);
  if (!replayed) noteArrival(parts, mention);
}

// The notices of fixed form, and what each tells us.  Anchored at the start,
// so text someone typed (a topic, a quit reason) cannot pass for one.
const NOTICES = [
  [/^Welcome, ([^ ]+)! /, m => { attempt = 0; setName(m[1]); }],
  [/^You are back as ([^ ]+) in #/, m => { attempt = 0; roomBeforeDrop = null; setName(m[1]); }],
  [/^([^ ]+) is now known as ([^ ]+)( [(]renamed by [^ ]+[)])?$/, m => renamed(m[1], m[2])],
  [/^You are in (#[^ ]+)$/, m => enterRoom(m[1])],
  [/^Topic of (#[^ ]+): (.*)$/, m => m[1] === room && setTopic(m[2])],
  [/^(#[^ ]+) has no topic$/, m => m[1] === room && setTopic('')],
  [/^[^ ]+ set the topic: (.*)$/, m => setTopic(m[1])],
  [/^([0-9]+) online in (#[^ ]+)(, page [0-9]+ of [0-9]+ [(][^)]*[)])?: (.*)$/,
   m => m[2] === room && listed(Number(m[1]), Boolean(m[3]), m[4])],
  [/^([^ ]+) joined$/, m => joined(1, [m[1]])],
  [/^([0-9]+) people joined: (.*)$/, m => joined(Number(m[1]), namesIn(m[2]))],
  [/^([^ ]+) left (?:[(]|for #)/, m => left(1, [m[1]])],
  [/^([0-9]+) people left: (.*)$/, m => left(Number(m[1]), leaverNames(m[2]))],
  [/^Last ([0-9]+) messages?( [(][^)]*[)])?:$/, m => { replaying = Number(m[1]); }],
  [/^This room needs a password/, askPassword],
  [/^Password accepted$/, passwordAccepted],
  [/^Goodbye$/, () => { stopReason = 'you left the chat'; }],
];
// Errors after which the server closes, and reconnecting would only repeat them.
const REFUSAL = /^(you were (kicked|banned) by |you are banned|server full|too many connections)|: goodbye$/;

function learn(parts) {
  if (parts.kind === 'notice') {
    const rule = NOTICES.find(([pattern]) => pattern.test(parts.body));
    if (rule) rule[1](rule[0].exec(parts.body));
  } else if (parts.kind === 'error') {
    if (REFUSAL.test(parts.body)) stopReason = parts.body;
    const refused = /^cannot use the name (.+?): /.exec(parts.body);
    if (refused && refused[1] === chosen) {   // the remembered name: ask again
      remember(null);
      showNameForm(refused[1], 'That name cannot be used now: pick another, or try again later.');
    }
  }
}

function setName(who) {
  name = who;
  // Any case, not inside a longer name ("malice", "alice.b"), though a full
  // stop may end the sentence ("see alice.").  The u flag allows escaping
  // only syntax characters (names hold none, but to be safe).
  const letter = ['p{L}', 'p{N}', 'p{M}'].map(p => BACKSLASH + p).join('') + '_';
  const escaped = Array.from(who, ch => '^$.*+?()[]{}|/'.includes(ch) ? BACKSLASH + ch : ch).join('');
  mentionPattern = new RegExp('(?<![' + letter + '.-])' + escaped
    + '(?![' + letter + ']|[.-][' + letter + '])', 'giu');
  renderMembers();
  unechoed.splice(0).forEach(echo);
}

function renamed(old, now) {
  if (members.has(old)) {
    members.set(now, members.get(old));
    members.delete(old);
  }
  if (old !== name) return renderMembers();
  if (!/^guest-/.test(now)) remember(now);
  setName(now);
}

function enterRoom(where) {
  room = where;
  members.clear();
  memberTotal = 0;
  setTopic('');
  $('room').textContent = where;
  renderMembers();
  updateTitle();
}

function setTopic(text) {
  topic = text;
  $('topic').textContent = text;
  $('topic').hidden = !text;
}

// "a, b (away), c (lost)", or "a, b and 12 others (/who lists them)".
function listed(count, paged, list) {
  list = list.replace(/ [(][/]who lists them[)]$/, '');
  if (!paged && !/ and [0-9]+ others$/.test(list)) members.clear();   // the whole room
  for (const item of namesIn(list)) {
    const away = / [(](away|lost)[)]$/.test(item);   // lost: it may come back
    members.set(away ? item.slice(0, -7) : item, away);
  }
  memberTotal = count;
  renderMembers();
}

function namesIn(list) {
  return list.replace(/ and [0-9]+ others$/, '').split(', ').filter(Boolean);
}

// "a (quit), b (for #dev) and 3 others": a quit reason is free text that
// may hold ", " and brackets, so walk to each reason's closing bracket.
function leaverNames(list) {
  const names = [];
  for (let at = 0, open; (open = list.indexOf(' (', at)) > 0;) {
    names.push(list.slice(at, open));
    let depth = 0, end = open + 1;
    for (; end < list.length; end++) {
      if (list[end] === '(') depth += 1;
      else if (list[end] === ')' && --depth === 0) break;
    }
    if (!list.startsWith(', ', end + 1)) break;
    at = end + 3;
  }
  return names;
}

function joined(count, names) {
  for (const who of names) {
    if (members.has(who)) count -= 1;
    else members.set(who, false);
  }
  memberTotal += count;
  renderMembers();
}

function left(count, names) {
  names.forEach(who => members.delete(who));
  memberTotal -= count;
  renderMembers();
}

function renderMembers() {
  const names = Array.from(members.keys()).sort((a, b) => a.localeCompare(b));
  $('members').replaceChildren(...names.map(who => {
    const item = el('li', (members.get(who) ? 'away' : '') + (who === name ? ' me' : ''));
    item.append(el('span', 'who ' + nameColour(who), who), members.get(who) ? ' (away)' : '');
    return item;
  }));
  memberTotal = Math.max(memberTotal, members.size);
  const more = memberTotal - members.size;
  if (more) $('members').append(el('li', 'more', 'and ' + more + ' more (/who)'));
  $('people-heading').textContent = 'Online (' + memberTotal + ')';
}

function askPassword() {
  greetAgain = true;   // the server answered our greeting with this prompt
  $('password-form').hidden = false;
  $('password-input').focus();
}

function passwordAccepted() {
  $('password-form').hidden = true;
  line.focus();
  if (greetAgain) greet();
  greetAgain = false;
}

// --- Showing lines ---

function render(kind, parts, when) {
  const item = el('li', 'line ' + kind + (kind.startsWith('pm-') ? ' private' : ''));
  const who = parts.name && el('span', 'who ' + nameColour(parts.name), parts.name);
  const heads = {public: [who, ': '], action: ['* ', who, ' '],
    'pm-from': [el('span', 'label', 'private from '), who, ': '],
    'pm-to': [el('span', 'label', 'private to '), who, ': ']};
  item.append(el('span', 'time', clock(when || new Date())), ' ', ...(heads[kind] || []));
  const text = el('span', 'text');
  // Our name is marked in what others say to us (as text nodes, like the rest).
  let last = 0;
  if (parts.name && parts.name !== name && kind !== 'pm-to' && mentionPattern) {
    for (const match of parts.body.matchAll(mentionPattern)) {
      text.append(parts.body.slice(last, match.index), el('mark', '', match[0]));
      last = match.index + match[0].length;
    }
  }
  text.append(parts.body.slice(last));
  item.append(text);
  return item;
}

function mentionsMe(parts) {
  return Boolean(mentionPattern && parts.name && parts.name !== name && parts.kind !== 'pm-to'
    && parts.body.search(mentionPattern) >= 0);
}

function appendLine(item, force) {
  log.append(item);
  while (log.childElementCount > MAX_LOG_LINES) log.firstElementChild.remove();
  if (stickToEnd || force) log.scrollTop = log.scrollHeight;
}

// A line of the page's own, not from the server.
function showLocal(kind, text) {
  const item = render(kind, {body: text});
  item.classList.add('local');
  appendLine(item, true);
}

// The server does not echo our public lines and actions: show them ourselves.
function echo(text) {
  if (!name) return unechoed.push(text);   // until the welcome names us
  const action = /^[/]me (.*[^ ].*)$/.exec(text);
  if (text.startsWith('/') && !text.startsWith('//') && !action) return;
  const parts = action ? {kind: 'action', body: action[1].trim()}
    : {kind: 'public', body: text.startsWith('//') ? text.slice(1) : text};
  const item = render(parts.kind, Object.assign(parts, {name}));
  item.classList.add('own');
  appendLine(item, true);
}

// While the tab is hidden: count unread lines (not notices) in the title,
// and raise a notification for a mention or a private message.
function noteArrival(parts, mention) {
  if (parts.kind === 'notice' || document.visibilityState !== 'hidden') return;
  unread += 1;
  updateTitle();
  if ((mention || parts.kind === 'pm-from') && window.Notification && Notification.permission === 'granted') {
    try {
      new Notification(parts.name + (parts.kind === 'pm-from' ? ' (private)' : ' in ' + room),
                       {body: parts.body, tag: 'chat'});
    } catch (error) { /* Chrome on Android notifies only from a service worker */ }
  }
}

function updateTitle() {
  document.title = (unread ? '(' + unread + ') ' : '') + (room ? room + ' — ' : '') + 'chat';
}

function updateNotifyButton() {
  $('notify-button').hidden = !window.Notification || Notification.permission !== 'default';
}

// --- Typing ---

function submitLine() {
  const text = line.value;
  const size = ENCODER.encode(text).length;
  if (!text.trim()) return;
  if (size > MAX_LINE_BYTES) {   // the text stays in the input, to be cut
    return showLocal('error', 'line too long (' + size + ' bytes; at most ' + MAX_LINE_BYTES + '): not sent');
  }
  if (!send(text)) return showLocal('error', 'not connected: the line is kept, to send once connected');
  if (!SECRET_LINE.test(text) && sent[sent.length - 1] !== text) sent.push(text);
  if (/^[/]quit( |$)/i.test(text)) stopReason = 'you left the chat';
  echo(text);
  line.value = draft = '';
  recallAt = sent.length;
}

function handleKey(event) {
  const imeBusy = event.isComposing || event.keyCode === 229 || composing;
  if (event.key === 'Enter') {
    // Enter sends from here, not by the form's implicit submission.  A real
    // IME's key (keyCode 229) is left alone: the IME needs it, and it submits nothing.
    if (event.keyCode !== 229) event.preventDefault();
    if (!imeBusy) submitLine();
  } else if ((event.key === 'ArrowUp' || event.key === 'ArrowDown') && !imeBusy
             && !(event.altKey || event.ctrlKey || event.metaKey || event.shiftKey)) {
    event.preventDefault();
    recall(event.key === 'ArrowUp' ? -1 : 1);
  }
}

// Up and Down walk the lines sent; past the newest is the draft being typed.
function recall(step) {
  const to = recallAt + step;
  if (to < 0 || to > sent.length) return;
  if (recallAt === sent.length) draft = line.value;
  recallAt = to;
  line.value = to === sent.length ? draft : sent[to];
  line.setSelectionRange(line.value.length, line.value.length);
}

function showNameForm(value, hint) {
  $('name-input').value = value;
  $('name-hint').textContent = hint;
  $('name-form').hidden = false;
  $('name-input').focus();
}

// The name form: remember the name, then connect, or rename if connected.
function chooseName(event) {
  event.preventDefault();
  const wanted = $('name-input').value.trim();
  if (!wanted || /[ <>*[]/.test(wanted) || wanted.includes(']')) {
    $('name-hint').textContent = 'A name is letters and digits (and _ - .), without spaces.';
    return;
  }
  remember(wanted);
  startChatting();
  if (!send('/nick ' + wanted) && !socket) connect();   // else greet() asks for it
}

function startChatting() {
  $('name-form').hidden = true;
  $('send-form').hidden = false;
  line.focus();
}

// --- Start ---

function start() {
  const https = location.protocol === 'https:';
  $('security').textContent = https ? 'encrypted' : 'not encrypted';
  $('security').className = https ? 'tls' : 'plain';
  $('people').open = !matchMedia('(max-width: 40rem)').matches;
  $('name-form').addEventListener('submit', chooseName);
  $('guest-button').addEventListener('click', () => { startChatting(); if (!socket) connect(); });
  $('password-form').addEventListener('submit', event => {
    event.preventDefault();   // the password is sent, never kept
    if (send('/pass ' + $('password-input').value)) $('password-input').value = '';
  });
  $('send-form').addEventListener('submit', event => {   // the Send button
    event.preventDefault();
    if (!composing) submitLine();
    line.focus();
  });
  line.addEventListener('keydown', handleKey);
  line.addEventListener('compositionstart', () => { composing = true; });
  line.addEventListener('compositionend', () => { composing = false; });
  $('retry-button').addEventListener('click', () => {
    stopReason = null;
    attempt = Math.max(attempt, 1);   // so that onOpen says "connected again"
    if (!socket) connect();
  });
  $('notify-button').addEventListener('click', () => {   // asked only on a click
    Notification.requestPermission().then(updateNotifyButton);
  });
  log.addEventListener('scroll', () => {
    stickToEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });
  // A phone's keyboard opening shrinks the log: keep its end in view.
  window.addEventListener('resize', () => { if (stickToEnd) log.scrollTop = log.scrollHeight; });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') unread = 0;
    updateTitle();
  });
  window.addEventListener('online', () => reconnectTimer && connect());
  updateNotifyButton();
  renderMembers();
  if (chosen) {
    startChatting();
    connect();
  } else {
    showNameForm('', '');
  }
}

// For tests and debugging only: a read-only summary of the state.
window.chat = Object.freeze({
  state: () => ({name, room, topic, members: Array.from(members.keys()), connected: isOpen,
    reconnecting: Boolean(reconnectTimer) || (attempt > 0 && !isOpen && !stopReason),
    stopped: stopReason}),
});

start();
</script>
</body>
</html>
"""


# --- Client ------------------------------------------------------------------

class Client:
    """Joins standard input and output to a chat server over one selector.
    What the user sees and types goes through a screen: PlainScreen for
    pipes and files, TerminalScreen (a line editor) for a terminal."""

    def __init__(self, sock, screen, name=None, stdin_fd=0, received=b'', history=True,
                 room=None, redial=None, name_password=None):
        self.sock = sock
        self.screen = screen
        self.wanted_name = name       # asked for on connect
        self.name_password = name_password  # its password, if registered and known
        self.wanted_room = room       # joined on connect
        self.history = history        # show the lines replayed on joining
        self.replayed = 0             # of those, how many are still to come
        self.naming = None            # piped: when we asked for our name, until answered
        self.refused = None           # the server's reason for refusing it
        self.selector = selectors.DefaultSelector()
        self.input, self.read_input = watchable_input(stdin_fd)
        self.inbuf = bytearray(received)  # from the server, not yet shown
        self.outbuf = bytearray()     # to the server, not yet sent
        self.lines_sent = 0
        self.quit_at = None           # when we said /quit
        self.server_rate = None       # lines per second, if the server said so
        self.unechoed = []            # lines we sent before we knew our name
        self.dismissed = False        # the server has answered it
        self.reading_input = False
        # Coming back after a lost connection (redial(first_line) -> (sock,
        # bytes read), or None: not here).
        self.redial = redial
        self.token = None             # the server's resume token, if it gave one
        self.seen = 0                 # lines received since it,
        self.heard = 0                # and of them, public lines of our room since we
        # entered it: what a server restarted with --data knows of (Session.before_restart)
        self.privately = 0            # and private messages since the token: what a
        # linked server we resume on instead of ours knows of (Link.missed)
        self.refusal = None           # the server shut the door: no coming back
        self.retry_at = None          # when to try to reconnect, while cut off
        self.attempt = 0              # tries since the loss
        self.retry_failure = None     # why the last try failed, once shown
        self.offline = []             # lines typed while cut off, sent once back
        self.room_before = None       # the room we were in when cut off

    def run(self):
        """Talk until the server closes; the exit status."""
        self.sock.setblocking(False)
        self.selector.register(self.sock, selectors.EVENT_READ)
        if self.screen.wakeup is not None:  # signals the screen must see
            self.selector.register(self.screen.wakeup, selectors.EVENT_READ)
        if self.wanted_name:
            self.ask_name(self.wanted_name)
            if self.screen.wakeup is None:  # piped: nothing is sent under a name refused
                self.naming = time.monotonic()
        if self.wanted_room:
            self.send_line('/join ' + self.wanted_room)
        self.watch_input(True)
        self.show_lines(b'')  # what authenticate() read past the password
        while True:
            if self.outbuf:  # what the last turn queued, in one send(): the
                self.flush()  # lines of one Alt-Enter message reach one server turn
            timeout = self.screen.timeout()
            if self.naming is not None:  # a server that never answers: carry on
                left = self.naming + CONNECT_TIMEOUT_SEC - time.monotonic()
                if left <= 0:
                    self.named()
                timeout = max(0.0, left) if timeout is None else min(timeout, max(0.0, left))
            if self.quit_at is not None:
                left = max(0.0, self.quit_at + self.goodbye_wait() - time.monotonic())
                if left == 0 or self.sock is None:
                    return 0
                timeout = left if timeout is None else min(timeout, left)
            if self.retry_at is not None:
                left = self.retry_at - time.monotonic()
                if left <= 0:
                    self.reconnect()
                    continue
                timeout = left if timeout is None else min(timeout, left)
            for key, mask in self.selector.select(timeout):
                if key.fileobj is self.screen.wakeup:
                    self.screen.on_wakeup()
                elif key.fileobj is not self.sock:
                    self.read_stdin()
                else:
                    if mask & selectors.EVENT_WRITE:
                        self.flush()
                    if mask & selectors.EVENT_READ:
                        status = self.read_server()
                        if status is not None:
                            return status
                        if self.refused:
                            self.screen.error('chat.py: error: %s' % self.refused)
                            return 1
            self.screen.expire()

    def read_server(self):
        """Show the lines the server sent; an exit status once it is gone."""
        while True:
            try:
                data = self.sock.recv(65536)
            except WOULD_BLOCK:
                return None
            except OSError as exc:
                return self.lost('connection lost: %s' % (exc.strerror or exc))
            if not data:
                return self.lost('the server closed the connection')
            self.show_lines(data)
            if not getattr(self.sock, 'pending', lambda: 0)():
                return None  # TLS: nothing more already decrypted

    def show_lines(self, data):
        """Show the complete lines that data completes."""
        self.inbuf += data
        end = self.inbuf.rfind(b'\n')
        lines = []
        if end >= 0:
            lines = bytes(self.inbuf[:end]).split(b'\n')
            del self.inbuf[:end + 1]
        if len(self.inbuf) > CLIENT_MAX_LINE_BYTES:  # a server that never ends a line
            lines.append(bytes(self.inbuf))
            del self.inbuf[:]
        if lines:
            self.show([decode(line) for line in lines])  # cleaned: the server is not trusted

    def show(self, texts):
        """Display lines from the server, noting our own name as it changes,
        the server's flood control rate, if it says so, and our resume
        token and how many lines came since."""
        shown, asked = [], None
        for text in texts:
            resume = RESUME_TOKEN.match(text)
            if resume:
                self.token, self.seen, self.heard, self.privately = resume.group(1), 0, 0, 0
                continue  # the client resumes by itself: the token need not be shown
            if self.token is not None:
                self.seen += 1
            if SPEAKER.match(text):
                self.heard += 1
            elif ENTERED.match(text):
                self.heard = 0
            elif text.startswith(PRIVATE_PREFIX):
                self.privately += 1
            if text.startswith('!!! ') and REFUSAL.search(text[4:]):
                self.refusal = text[4:]
            elif text.startswith('!!! cannot resume'):
                self.rejoin()
            welcome, renamed = WELCOME.match(text), RENAMED.match(text)
            wanted = NAME_PASSWORD_WANTED.match(text)
            flood, replay = FLOOD_NOTICE.match(text), LAST_MESSAGES.match(text)
            limit = LINE_LIMIT.match(text)
            self.screen.people.hear(text)
            if self.replayed:  # a line said before we came
                self.replayed -= 1
                if not self.history:
                    continue
            elif replay and not self.history:
                self.replayed = int(replay.group(1))
                continue
            if welcome:
                self.screen.name = welcome.group(1)
                self.screen.max_line = MAX_LINE_BYTES  # unless this server says (LINE_LIMIT)
            elif renamed and renamed.group(1) == self.screen.name:
                self.screen.name = renamed.group(2)
                self.named()
            elif text == '-!- ' + GOODBYE:
                self.dismissed = True
            elif flood:
                self.server_rate = float(flood.group(1))
            elif limit:
                self.screen.max_line = int(limit.group(1))
            elif self.naming is not None and text.startswith(NAME_REFUSED):
                self.refused = text[4:] + (' (set CHAT_NAME_PASSWORD)' if (
                    wanted and not self.name_password) else '')
            elif wanted:
                asked = wanted
            shown.append(text)
        self.screen.show(shown)
        if self.unechoed and self.screen.name:
            for line in self.unechoed:
                self.screen.echo(own_line(self.screen.name, line))
            self.unechoed = []
        if asked:  # once what came before it is on the screen
            self.password_wanted(asked.group(1) or asked.group(2))

    def named(self):
        """Our name is settled (or the server will not say): start sending."""
        if self.naming is not None:
            self.naming = None
            self.watch_input(True)

    def lost(self, why):
        """The connection is over: show what is left; the exit status (0 if
        we asked to leave and the server said goodbye), or None if we try
        to come back."""
        if self.dismissed or self.redial is None or self.refusal is not None or (
                self.quit_at is not None):
            if self.inbuf:
                self.show([decode(bytes(self.inbuf))])
            if self.dismissed:
                return 0
            self.screen.error('chat.py: %s' % why)
            return 1
        del self.inbuf[:]  # an unfinished line comes again, whole, with the rest
        self.room_before = self.screen.people.room
        self.screen.error('chat.py: %s; reconnecting…' % why)
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock, self.attempt = None, 0
        self.outbuf = bytearray()  # the server has it, or it is lost: resuming tells
        self.schedule_reconnect()
        return None

    def schedule_reconnect(self):
        """The next try after 1, 2, 4 ... 30 seconds, give or take a fifth
        (a restarted server is not hit by everyone at once)."""
        wait = RECONNECT_BACKOFF_SEC[min(self.attempt, len(RECONNECT_BACKOFF_SEC) - 1)]
        wait *= 1 + RECONNECT_JITTER * (2 * random.random() - 1)
        self.retry_at = time.monotonic() + wait
        self.screen.set_status('reconnecting…')

    def reconnect(self):
        """Try once to connect again: resume with the token if we have one,
        else join anew with our name and room; then send what was typed."""
        first = ('resume %s %d %d %d' % (self.token, self.seen, self.heard, self.privately)
                 if self.token else '')
        try:
            sock, received = self.redial('/' + first if first else '')
        except (UserError, OSError) as exc:
            why = 'chat.py: %s' % (getattr(exc, 'strerror', None) or exc)
            if why != self.retry_failure:  # once per reason, not every try
                self.retry_failure = why
                self.screen.error(why + '; trying again')
            self.attempt += 1
            self.schedule_reconnect()
            return
        self.sock, self.retry_at, self.retry_failure = sock, None, None
        self.sock.setblocking(False)
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.screen.set_status(None)
        self.screen.note('connected again')
        if not first:
            self.rejoin()
        for line in self.offline:
            self.send_line(line)
        self.offline = []
        self.show_lines(received)

    def rejoin(self):
        """In as a newcomer after all: ask for our name and room again."""
        self.token = None
        if self.screen.name and not self.screen.name.startswith(GUEST_PREFIX):
            self.ask_name(self.screen.name)
        elif self.wanted_name:
            self.ask_name(self.wanted_name)
        room = self.room_before or self.screen.people.room
        if room and room != '#' + LOBBY:
            self.send_line('/join ' + room)

    def ask_name(self, name):
        """/nick NAME, with its password if it is the name we have one for."""
        if self.name_password and self.wanted_name and (
                name_key(name) == name_key(self.wanted_name)):
            self.send_line('/nick %s %s' % (name, self.name_password))
        else:
            self.send_line('/nick ' + name)

    def password_wanted(self, name):
        """The server wants the password of the name we asked for (or had a
        wrong one): ask, without echo, on a terminal, and send it."""
        if self.wanted_name is None or name_key(name) != name_key(self.wanted_name):
            return
        password = self.screen.ask_secret('Password for the name %s: ' % name)
        if password:
            self.name_password = password
            self.ask_name(name)

    def read_stdin(self):
        """Send each line typed or piped in; at the end of input, /quit."""
        try:
            data = self.read_input()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        for line in self.screen.feed(data):
            if line is None:  # end of input: leave
                self.watch_input(False)
                if self.quit_at is None:
                    self.send_line('/quit')
                return
            self.send_line(line)
            if self.screen.name:
                self.screen.echo(own_line(self.screen.name, line))
            else:  # shown once the welcome says our name
                self.unechoed.append(line)

    def send_line(self, line):
        """Queue one line for the server (the loop sends it at the end of
        the turn).  After a /quit, input is over and
        the client waits (bounded) for the server to take the lines sent
        and close."""
        if self.sock is None:  # cut off: sent once back, in order
            if len(self.offline) < RECONNECT_KEEP_LINES:
                self.offline.append(line)
            else:
                self.screen.error('chat.py: not connected; %d lines wait already, this one '
                                  'is not kept' % RECONNECT_KEEP_LINES)
            if line == '/quit' or line.startswith('/quit '):
                self.quit_at = time.monotonic()
            return
        self.outbuf += line.encode('utf-8', 'surrogateescape') + b'\n'
        self.lines_sent += 1
        if line == '/quit' or line.startswith('/quit '):
            self.quit_at = time.monotonic()
            self.watch_input(False)

    def goodbye_wait(self):
        """How long after /quit to wait for the server's goodbye: a while,
        plus what its flood control needs to take the lines we sent (at the
        rate it told us, else the default)."""
        if self.server_rate:  # its burst is not said: count every line
            return QUIT_WAIT_SEC + self.lines_sent / self.server_rate
        return QUIT_WAIT_SEC + max(0, self.lines_sent - RATE_BURST_LINES) / RATE_LINES_PER_SEC

    def flush(self):
        """Send what the socket takes now; watch for writability only while
        something is left, and read no more input while a lot is."""
        if self.sock is None:
            return
        try:
            sent = send_some(self.sock, self.outbuf)
        except OSError:
            sent = len(self.outbuf)  # the read side reports the loss
        del self.outbuf[:sent]
        self.selector.modify(self.sock, selectors.EVENT_READ |
                             (selectors.EVENT_WRITE if self.outbuf else 0))
        self.watch_input(len(self.outbuf) <= MAX_BACKLOG_BYTES)

    def watch_input(self, wanted):
        """Start or stop reading standard input (never after /quit, nor
        while a piped client waits to hear if its name is taken)."""
        wanted = wanted and self.quit_at is None and self.naming is None
        if wanted and not self.reading_input:
            self.selector.register(self.input, selectors.EVENT_READ)
        elif self.reading_input and not wanted:
            self.selector.unregister(self.input)
        self.reading_input = wanted


class People:
    """Who is in the client's room, as far as the lines it hears say: for
    completing names with Tab, and for the room in the prompt."""

    def __init__(self):
        self.room = None          # '#dev'
        self.names = set()

    def hear(self, text):
        """Learn from one line from the server."""
        entered, listed = ENTERED.match(text), ROOM_LIST.match(text)
        joined, left, renamed = JOINED.match(text), LEFT.match(text), RENAMED.match(text)
        speaker = SPEAKER.match(text)
        if entered:
            self.room, self.names = entered.group(1), set()
        elif listed and listed.group(1) == self.room:
            names = re.sub(r' and \d+ others$', '', listed.group(2))  # name_list()
            self.names.update(name.split(' ')[0] for name in names.split(', '))
        elif joined:
            self.names.add(joined.group(1))
        elif left:
            self.names.discard(left.group(1))
        elif renamed:
            self.names.discard(renamed.group(1))
            self.names.add(renamed.group(2))
        elif speaker:
            self.names.add(speaker.group(1) or speaker.group(2))


# The lines that tell a client its own name (the welcome, and renames), and
# the rate at which the server takes its lines.
WELCOME = re.compile(r'^-!- Welcome, (\S+)!')
REPLAYED = re.compile(r'\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\] ')  # a history line
RESUME_TOKEN = re.compile('^-!- ' + re.escape(RESUME_NOTICE.split('%s')[0]) + r'(\S+)$')
# The server shut the door on us: reconnecting would only repeat it.
REFUSAL = re.compile(r'^(you were (kicked|banned) by |you are banned|server full|too many '
                     r'connections)|: goodbye$')
LAST_MESSAGES = re.compile(r'^-!- Last (\d+) messages?( \(.*\))?:$')  # then that many replayed
RENAMED = re.compile(r'^-!- (\S+) is now known as (\S+)(?: \(renamed by \S+\))?$')
NAME_REFUSED = ('!!! cannot use the name ', '!!! wrong password for the name ')
NAME_PASSWORD_WANTED = re.compile(r'^!!! (?:cannot use the name (\S+): it is registered|'
                                  r'wrong password for the name (\S+) \()')
FLOOD_NOTICE = re.compile(r'^-!- flood control: .* ([0-9.]+) per second$')
LINE_LIMIT = re.compile(r'^-!- lines here hold at most (\d+) bytes$')
# And those that tell it where it is and who is there.
ENTERED = re.compile(r'^-!- You are in (#\S+)$')
ROOM_LIST = re.compile(r'^-!- \d+ online in (#\S+): (.*?)( \(/who lists them\))?$')
JOINED = re.compile(r'^-!- (\S+) joined$')
LEFT = re.compile(r'^-!- (\S+) left ')
SPEAKER = re.compile(r'^(?:<(\S+)> |\* (\S+) )')


def local_time(stamp):
    """A replayed line's UTC stamp as local HH:MM, with the date unless it is today."""
    seconds = stamp_seconds(stamp)
    if seconds is None:
        return stamp
    when = time.localtime(seconds)
    today = time.localtime()[:3] == when[:3]
    return time.strftime('%H:%M' if today else '%Y-%m-%d %H:%M', when)


def own_line(name, line):
    """How a line we sent looks to the others, or None if it is not public:
    the server does not echo our own messages, so the terminal shows them."""
    if line.startswith('//'):
        return '<%s> %s' % (name, line[1:])
    if line.startswith('/me ') and line[4:].strip():
        return '* %s %s' % (name, line[4:].strip())
    if line.startswith('/') or not line.strip():
        return None
    return '<%s> %s' % (name, line)


class PlainScreen:
    """Lines in, lines out, no escape sequences: for pipes, files, scripts,
    and Windows consoles, where the line editor falls back to cooked mode."""

    wakeup = None
    name = None

    def __init__(self, out):
        self.out = out
        self.people = People()
        self.typed = bytearray()  # input not yet a whole line

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def show(self, texts):
        self.out.buffer.write(''.join(text + '\n' for text in texts).encode('utf-8'))
        self.out.flush()

    def echo(self, text):
        pass  # a script sees the room exactly as the server sends it

    def note(self, text):
        pass  # nor anything but what the server sends

    def error(self, text):
        print(text, file=sys.stderr)

    def set_status(self, text):
        pass  # error() said it: a pipe has no prompt to show it in

    def ask_secret(self, prompt):
        return None  # piped input is lines to send: CHAT_NAME_PASSWORD is the way

    def feed(self, data):
        """The complete lines in data; None last when input has ended."""
        if not data:
            return ([self.typed.decode('utf-8', 'surrogateescape')] if self.typed else []) + [None]
        self.typed += data
        end = self.typed.rfind(b'\n')
        if end < 0:
            return []
        lines = bytes(self.typed[:end]).decode('utf-8', 'surrogateescape').split('\n')
        del self.typed[:end + 1]
        return [line.rstrip('\r') for line in lines]

    def timeout(self):
        return None

    def expire(self):
        pass


def watchable_input(fd):
    """What the client's selector watches for input, and how to read it:
    fd itself when a selector can watch it, else a socket that a thread
    feeds from fd.  That covers Windows, where select() takes only sockets,
    and regular files and /dev/null, which epoll refuses.  Setting
    CHAT_STDIN_THREAD=1 forces the thread, so that path is tested anywhere."""
    if os.name == 'posix' and not os.environ.get('CHAT_STDIN_THREAD'):
        probe = selectors.DefaultSelector()
        try:
            probe.register(fd, selectors.EVENT_READ)
            return fd, lambda: os.read(fd, 65536)
        except (OSError, ValueError):
            pass
        finally:
            probe.close()
    ours, theirs = socket.socketpair()

    def forward():
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                theirs.sendall(data)  # blocks while the client holds back
        except OSError:
            pass  # a closed or unreadable input ends like an empty one
        finally:
            theirs.close()
    threading.Thread(target=forward, daemon=True).start()
    return ours, lambda: ours.recv(65536)


def connect(host, port, tls=False, cafile=None, pinned=None):
    """A connected socket to host:port, in TLS if asked (never falling back to
    plain text), and a few words on what protects it; or a UserError."""
    host = host.strip('[]')  # accept [::1] as well as ::1
    sock = open_connection(host, port)
    if not (tls or cafile or pinned):
        return sock, 'not encrypted: anyone on the network can read this chat'
    try:
        if cafile:
            return client_tls(sock, host, cafile)
        if pinned:  # the fingerprint given is remembered: next time --tls will do
            tls, protection = client_tls(sock, host, pinned=pinned)
            where = printable_address((host, port))
            if known_fingerprints().get(where) != pinned:
                remember_fingerprint(where, pinned)
            return tls, protection
        return trusted_tls(sock, host, port)
    except BaseException:
        sock.close()
        raise


def open_connection(host, port):
    """A TCP connection to host:port, or a UserError saying why not."""
    try:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SEC)
    except socket.gaierror as exc:
        raise UserError('cannot find host %s: %s' % (host, exc.strerror))
    except ConnectionRefusedError:
        raise UserError('cannot connect to %s port %d: connection refused '
                        '(is the server running?)' % (host, port))
    except socket.timeout:
        raise UserError('cannot connect to %s port %d: timed out' % (host, port))
    except OSError as exc:
        raise UserError('cannot connect to %s port %d: %s' % (host, port, exc.strerror))


def default_name():
    """The login name, when it is a valid chat name."""
    try:
        name = getpass.getuser()
    except Exception:  # getuser() raises whatever its last lookup raised
        return None
    return name if name_problem(name) is None else None


# --- Terminal line editor ------------------------------------------------------

ESCAPE_WAIT_SEC = 0.05     # a lone ESC is a key, not a sequence, after this
LEAVE = object()           # what the line editor returns for Ctrl-D on an empty line
# Lines that carry a password, which Up must not show again; the page has
# the same pattern, written the same way (no backslash: see PAGE).
SECRET_LINE = re.compile('^[/](pass|op|register) |^[/]nick [^ ]+ [^ ]', re.IGNORECASE)
NAME_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)  # SGR foregrounds
STYLES = {'time': '2', 'notice': '2', 'error': '1;31', 'private': '1;35',
          'own': '1', 'mention': '1;7', 'prompt': '1'}
CONTROL_KEYS = {'\x01': 'home', '\x02': 'left', '\x04': 'eof', '\x05': 'end',
                '\x06': 'right', '\x07': 'cancel', '\x08': 'backspace', '\x0b': 'kill_end',
                '\x0c': 'redraw', '\r': 'enter', '\n': 'enter', '\x0e': 'down', '\x10': 'up',
                '\t': 'complete', '\x12': 'search', '\x14': 'transpose', '\x15': 'kill_start',
                '\x17': 'kill_word', '\x7f': 'backspace'}
# What follows ESC: xterm, VT100 keypad (SS3), rxvt and Linux console forms;
# Alt and a key, or Alt and a sequence (PuTTY, rxvt), as readline reads them.
ESCAPE_KEYS = {'[A': 'up', '[B': 'down', '[C': 'right', '[D': 'left', '[H': 'home',
               '[F': 'end', 'OA': 'up', 'OB': 'down', 'OC': 'right', 'OD': 'left',
               'OH': 'home', 'OF': 'end', '[1~': 'home', '[7~': 'home', '[4~': 'end',
               '[8~': 'end', '[3~': 'delete',
               '[1;5D': 'word_left', '[1;3D': 'word_left', '[5D': 'word_left', 'Od': 'word_left',
               '\x1b[D': 'word_left', 'b': 'word_left',
               '[1;5C': 'word_right', '[1;3C': 'word_right', '[5C': 'word_right',
               'Oc': 'word_right', '\x1b[C': 'word_right', 'f': 'word_right',
               '\x7f': 'kill_word', '\x08': 'kill_word', 'd': 'kill_next_word',
               '\r': 'newline', '\n': 'newline', '[27;2;13~': 'newline', '[13;2u': 'newline'}
LINE_BREAK_SHOWN = '\u21b5'  # how a line break inside the line being typed looks
CURSOR_REPORT = re.compile(r'^\[\d+;(\d+)R$')  # "row;column", where the cursor is
CURSOR_REPORT_WAIT_SEC = 0.3   # a terminal that has not answered by then never will


# Format characters that show (Arabic number signs and the like): one column.
VISIBLE_FORMAT = '\u00ad\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2'


def char_width(ch):
    """Terminal columns a character takes, as glibc's wcwidth() counts them:
    2 for East Asian wide and fullwidth ones (Hangul, kanji, most emoji), 0
    for combining marks, the vowels and finals of decomposed Hangul (they
    join the syllable before them) and invisible format characters, else 1."""
    category = unicodedata.category(ch)
    if category in ('Mn', 'Me') or '\u1160' <= ch <= '\u11ff' or '\ud7b0' <= ch <= '\ud7ff':
        return 0
    if category == 'Cf' and ch not in VISIBLE_FORMAT:
        return 0
    return 2 if unicodedata.east_asian_width(ch) in 'WF' else 1


def text_width(text):
    return sum(char_width(ch) for ch in text)


WRAPPED_INDENT = '      '    # under the text after "HH:MM ": a wrapped tail never
# starts at column 0, where padding could make it pass for a line of its own


def wrap(text, columns):
    """text, which may hold colour (SGR) sequences and start with a bell, cut
    into rows of the terminal's width, every row after the first indented."""
    rows, row, width = [], [], 0
    for piece in re.split('(\x1b\\[[0-9;]*m|^\a)', text):
        if piece[:1] in ('\x1b', '\a'):
            row.append(piece)  # takes no room
            continue
        for ch in piece:
            if width + char_width(ch) > columns:
                rows.append(''.join(row))
                row, width = [WRAPPED_INDENT], len(WRAPPED_INDENT)
            row.append(ch)
            width += char_width(ch)
    rows.append(''.join(row))
    return '\r\n'.join(rows)


def cut_to_width(text, width):
    """text, or as much of it as fits width columns with an ellipsis."""
    if text_width(text) <= width:
        return text
    while text and text_width(text) > max(0, width - 1):
        text = text[:-1]
    return text + '\u2026'


class KeyReader:
    """Turns bytes typed at a terminal into keys: one-character strings for
    text, names for control keys and escape sequences.  A character or a
    sequence may arrive split across reads."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder('utf-8')('replace')
        self.pending = ''         # the start of an escape sequence
        self.pending_since = 0.0

    def feed(self, data):
        text = self.pending + self.decoder.decode(data)
        keys, i = [], 0
        while i < len(text):
            ch = text[i]
            if ch == '\x1b':
                end = escape_end(text, i)
                if end is None:  # wait a moment for the rest of it
                    if not self.pending:
                        self.pending_since = time.monotonic()
                    self.pending = text[i:]
                    return keys
                sequence = text[i + 1:end]
                report = CURSOR_REPORT.match(sequence)
                if sequence in ESCAPE_KEYS:
                    keys.append(ESCAPE_KEYS[sequence])
                elif report:  # the terminal's answer to ESC [ 6 n
                    keys.append('cursor_at %s' % report.group(1))
                i = end  # unknown sequences are ignored, not inserted
            else:
                if ch in CONTROL_KEYS:
                    keys.append(CONTROL_KEYS[ch])
                elif ord(ch) not in UNPRINTABLE:  # other control keys are ignored
                    keys.append(ch)
                i += 1
        self.pending = ''
        return keys

    def expire(self):
        """Forget an escape sequence that never finished (a lone ESC)."""
        if self.pending and time.monotonic() - self.pending_since >= ESCAPE_WAIT_SEC:
            self.pending = ''


def escape_end(text, i):
    """Where the escape sequence at text[i] ends, or None if it is unfinished:
    CSI (ESC [ parameters final), SS3 (ESC O x), the Linux console's
    function keys (ESC [ [ x), ESC and one key (Alt), or ESC and a whole
    sequence (Alt and an arrow, as PuTTY and rxvt send it)."""
    if i + 1 >= len(text):
        return None
    if text[i + 1] == '\x1b':
        return escape_end(text, i + 1)
    if text[i + 1] == 'O':
        return i + 3 if i + 2 < len(text) else None
    if text[i + 1] != '[':
        return i + 2
    if text[i + 2:i + 3] == '[':
        return i + 4 if i + 3 < len(text) else None
    for j in range(i + 2, len(text)):
        if not '\x20' <= text[j] <= '\x3f':  # past parameters and intermediates
            return j + 1 if '\x40' <= text[j] <= '\x7e' else j
    return None


class LineEditor:
    """The line being typed: its characters, the cursor, and the lines sent
    earlier to recall.  Keys are dispatched to key_* methods by name."""

    def __init__(self, people=None):
        self.people = people     # whose names Tab completes
        self.chars = []
        self.cursor = 0
        self.history = []
        self.recalled = 0        # index into history while browsing it
        self.draft = []          # the unsent line, kept while browsing
        self.query = None        # what Ctrl-R searches the sent lines for, while it does
        self.found = 0           # where in history it last found it

    def press(self, key):
        """Apply one key: the text if Enter sends some (line breaks in it
        from Alt-Enter), LEAVE for Ctrl-D on an empty line, else None."""
        if self.query is not None and self.searched(key):
            return None
        if len(key) == 1:
            self.chars[self.cursor:self.cursor] = [key]
            self.cursor += 1
            return None
        self.compose()  # what was typed is whole characters before the cursor moves
        return getattr(self, 'key_' + key)()

    def key_enter(self):
        line = ''.join(self.chars)
        self.chars, self.cursor = [], 0
        if line.strip() and not SECRET_LINE.match(line):  # Up shows no password
            self.history.append(line)
        self.recalled = len(self.history)  # browsing starts again from the end
        return line if line.strip() else None

    def key_newline(self):
        """Alt-Enter: a line break in what is typed; Enter sends each line."""
        self.press('\n')

    def key_cancel(self):
        pass  # Ctrl-G ends a search (see searched), else nothing

    # Ctrl-R: search the lines sent, newest first, as readline does.

    def key_search(self):
        self.draft, self.query, self.found = self.chars, '', len(self.history)

    def searched(self, key):
        """Handle key while searching; False if it ends the search and is
        then to be applied to the line found (Enter sends it)."""
        if len(key) == 1:
            self.query += key
            self.find(min(self.found, len(self.history) - 1))
        elif key == 'backspace':
            self.query = self.query[:-1]
            self.find(len(self.history) - 1)
        elif key == 'search':
            self.find(self.found - 1)
        elif key == 'cancel':
            self.query, self.chars, self.cursor = None, self.draft, len(self.draft)
        else:
            self.query = None
            return False
        return True

    def find(self, start):
        """Show the newest sent line at or before start that holds the query."""
        for i in range(start, -1, -1):
            if self.query in self.history[i]:
                self.found, self.chars = i, list(self.history[i])
                self.cursor = len(self.chars)
                return

    def key_eof(self):
        return self.key_delete() if self.chars else LEAVE

    def key_left(self):
        while self.cursor > 0:
            self.cursor -= 1
            if char_width(self.chars[self.cursor]):  # skip combining marks
                break

    def key_right(self):
        if self.cursor < len(self.chars):
            self.cursor += 1
            while self.cursor < len(self.chars) and not char_width(self.chars[self.cursor]):
                self.cursor += 1

    def key_backspace(self):
        if self.cursor > 0:
            end = self.cursor
            self.key_left()
            del self.chars[self.cursor:end]

    def key_delete(self):
        if self.cursor < len(self.chars):
            start = self.cursor
            self.key_right()
            del self.chars[start:self.cursor]
            self.cursor = start

    def key_home(self):
        self.cursor = 0

    def key_end(self):
        self.cursor = len(self.chars)

    def key_kill_end(self):
        del self.chars[self.cursor:]

    def key_kill_start(self):
        del self.chars[:self.cursor]
        self.cursor = 0

    def key_kill_word(self):
        """Ctrl-W, Alt-Backspace: delete the word before the cursor."""
        start = self.word_start()
        del self.chars[start:self.cursor]
        self.cursor = start

    def key_kill_next_word(self):
        """Alt-D: delete to the end of the word under or after the cursor."""
        del self.chars[self.cursor:self.word_end()]

    def key_word_left(self):
        self.cursor = self.word_start()

    def key_word_right(self):
        self.cursor = self.word_end()

    def word_start(self):
        """Where the word before the cursor starts (words are letters and
        digits of any script, as readline's are)."""
        start = self.cursor
        while start > 0 and not self.chars[start - 1].isalnum():
            start -= 1
        while start > 0 and self.chars[start - 1].isalnum():
            start -= 1
        return start

    def word_end(self):
        end = self.cursor
        while end < len(self.chars) and not self.chars[end].isalnum():
            end += 1
        while end < len(self.chars) and self.chars[end].isalnum():
            end += 1
        return end

    def key_complete(self):
        """Tab: complete the word before the cursor: a command's name at the
        start of the line, else the name of someone in the room; as far as
        all that fit agree, and with a space when only one does."""
        start = self.cursor
        while start > 0 and not self.chars[start - 1].isspace():
            start -= 1
        word = ''.join(self.chars[start:self.cursor])
        if not word:
            return
        if start == 0 and word.startswith('/'):
            pool = ['/' + command for command in COMMAND_WORDS]
        else:
            pool = sorted(self.people.names) if self.people else []
        matches = [choice for choice in pool if choice.casefold().startswith(word.casefold())]
        if not matches:
            return
        common = os.path.commonprefix([choice.casefold() for choice in matches])
        completion = matches[0][:len(common)] + (' ' if len(matches) == 1 else '')
        self.chars[start:self.cursor] = list(completion)
        self.cursor = start + len(completion)

    def key_transpose(self):
        """Ctrl-T: swap the characters before and under the cursor (the last
        two at the end of the line), and move on."""
        if len(self.chars) < 2 or self.cursor == 0:
            return
        if self.cursor == len(self.chars):
            self.cursor -= 1
        chars = self.chars
        chars[self.cursor - 1], chars[self.cursor] = chars[self.cursor], chars[self.cursor - 1]
        self.cursor += 1

    def key_up(self):
        if self.recalled > 0:
            if self.recalled == len(self.history):
                self.draft = self.chars
            self.recalled -= 1
            self.chars = list(self.history[self.recalled])
            self.cursor = len(self.chars)

    def key_down(self):
        if self.recalled < len(self.history):
            self.recalled += 1
            self.chars = (list(self.history[self.recalled]) if self.recalled < len(self.history)
                          else self.draft)
            self.cursor = len(self.chars)

    def key_redraw(self):
        pass  # every key redraws the line

    def compose(self):
        """Compose what was typed or pasted to NFC on either side of the
        cursor, so that decomposed Hangul (as macOS file names hold it)
        becomes the syllables a terminal shows, and the cursor stays true."""
        before = unicodedata.normalize('NFC', ''.join(self.chars[:self.cursor]))
        after = unicodedata.normalize('NFC', ''.join(self.chars[self.cursor:]))
        if len(before) + len(after) != len(self.chars):
            self.chars, self.cursor = list(before + after), len(before)


class TerminalScreen:
    """Messages scroll up the terminal's own scrollback while the line being
    typed stays intact below them: each message clears the input line,
    prints, and redraws it with the cursor where it was.  The terminal is in
    non-canonical, no-echo mode (signals still work) until __exit__, which
    every way out passes through."""

    def __init__(self, fd_in, fd_out, colour):
        self.fd_in, self.fd_out = fd_in, fd_out
        self.colour = colour
        self.keys = KeyReader()
        self.people = People()
        self.editor = LineEditor(self.people)
        self.name = None          # ours, once the server has said it
        self.max_line = MAX_LINE_BYTES  # the server's (LINE_LIMIT): longer stays typed
        self.status = None        # shown before the prompt: "reconnecting…"
        self.scroll = 0           # first character shown, for lines wider than the screen
        self.drawn_column = 0     # where the cursor was left by the last redraw
        self.asked_at = None      # when we asked the terminal where its cursor is
        self.saved = None         # the terminal settings to restore
        self.resized = False      # a signal said the window changed size
        self.wakeup = self.wakeup_w = None
        self.previous = {}        # signal handlers to restore

    def __enter__(self):
        self.saved = termios.tcgetattr(self.fd_in)
        self.enter_raw_mode()
        # Signal handlers only set flags; this socket wakes the selector.
        self.wakeup, self.wakeup_w = socket.socketpair()
        for sock in (self.wakeup, self.wakeup_w):
            sock.setblocking(False)
        self.previous['wakeup'] = signal.set_wakeup_fd(self.wakeup_w.fileno())
        for signum, handler in ((signal.SIGWINCH, self.on_resize),
                                (signal.SIGTSTP, self.on_suspend)):
            self.previous[signum] = signal.signal(signum, handler)
        self.write(self.input_line())
        return self

    def __exit__(self, *exc_info):
        self.write('\r\x1b[K')
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self.saved)
        for signum in (signal.SIGWINCH, signal.SIGTSTP):
            signal.signal(signum, self.previous[signum])
        signal.set_wakeup_fd(self.previous['wakeup'])
        self.wakeup.close()
        self.wakeup_w.close()

    def enter_raw_mode(self):
        attrs = termios.tcgetattr(self.fd_in)
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)  # ISIG stays
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, attrs)

    def on_resize(self, signum, frame):
        self.resized = True

    def on_suspend(self, signum, frame):
        """Ctrl-Z: give the shell a sane terminal, stop, and on `fg` come back
        in edit mode with the line redrawn."""
        self.write('\r\x1b[K')
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self.saved)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, self.on_suspend)
        self.enter_raw_mode()
        self.resized = True

    def on_wakeup(self):
        """After a resize: a narrower terminal may have wrapped the line being
        typed onto several rows (VTE, kitty and tmux rewrap), leaving all but
        the last in the scrollback.  Ask the terminal where its cursor is
        (DSR); redraw_resized() clears those rows once it answers."""
        drain(self.wakeup)
        if self.resized:
            self.resized = False
            if self.drawn_column >= self.columns():
                self.asked_at = time.monotonic()
                self.write('\x1b[6n')
            else:
                self.redraw_resized(None)

    def redraw_resized(self, column):
        """Redraw the input line from its first row: if the terminal reports
        the cursor where rewrapping would put it, go up the rows it moved."""
        self.asked_at = None
        self.scroll = 0  # after widening, show from the start again
        rows_up = 0
        if column is not None and column - 1 == self.drawn_column % self.columns():
            rows_up = self.drawn_column // self.columns()
        self.write(('\x1b[%dA' % rows_up if rows_up else '') + '\r\x1b[J' + self.input_line())

    def timeout(self):
        if self.asked_at is not None:
            return CURSOR_REPORT_WAIT_SEC
        return ESCAPE_WAIT_SEC if self.keys.pending else None

    def expire(self):
        self.keys.expire()
        if self.asked_at is not None and time.monotonic() - self.asked_at > CURSOR_REPORT_WAIT_SEC:
            self.redraw_resized(None)  # a terminal that does not answer

    def write(self, text):
        data = text.encode('utf-8')
        while data:
            data = data[os.write(self.fd_out, data):]

    # Output --------------------------------------------------------------------

    def columns(self):
        """The terminal's width, asked of the terminal itself (a COLUMNS
        variable left from before a resize would be stale)."""
        try:
            return max(2, os.get_terminal_size(self.fd_out).columns)
        except OSError:
            return 80

    def show(self, texts):
        columns = self.columns()
        self.write('\r\x1b[K' + ''.join(wrap(self.styled(text), columns) + '\r\n'
                                         for text in texts) + self.input_line())

    def echo(self, text):
        if text is not None:
            self.show([text])

    def error(self, text):
        self.show([text])

    def note(self, text):
        """A line of the client's own (what protects the connection)."""
        self.show(['chat.py: ' + text])

    def set_status(self, text):
        """Say in the prompt that we are cut off (text), or no longer (None)."""
        self.status = text
        self.show([])

    def ask_secret(self, prompt):
        """A line typed without echo (a password): getpass, with the terminal
        as it was; then the line editor again.  None if the user gives none."""
        self.write('\r\x1b[K')
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self.saved)
        try:
            return getpass.getpass(prompt)
        except EOFError:
            return None
        finally:
            self.enter_raw_mode()
            self.write(self.input_line())

    def paint(self, style, text):
        return '\x1b[%sm%s\x1b[0m' % (style, text) if self.colour and text else text

    def name_colour(self, name):
        """Each name in a colour of its own, the same in every session."""
        return str(NAME_COLOURS[zlib.crc32(name_key(name).encode()) % len(NAME_COLOURS)])

    def styled(self, text):
        """A line from the room as shown: local time (for a replayed line,
        when it was said), then the line with its kind styled apart.
        Someone saying our name rings the bell."""
        said = REPLAYED.match(text)
        if said:
            text = text[said.end():]
        stamp = self.paint(STYLES['time'], local_time(said.group(1)) if said
                           else time.strftime('%H:%M'))
        match = re.match(r'(<(\S+)> |\* (\S+) )(.*)', text)
        if match:
            name = match.group(2) or match.group(3)
            head = match.group(1).replace(name, self.paint(self.name_colour(name), name), 1)
            body = match.group(4)
            if name == self.name:
                body = self.paint(STYLES['own'], body)
            elif self.name and re.search(r'(?<![\w.-])%s(?![\w.-])' % re.escape(self.name),
                                         body, re.IGNORECASE):
                return '\a%s %s%s' % (stamp, head, self.paint(STYLES['mention'], body))
            return '%s %s%s' % (stamp, head, body)
        for prefix, style in (('[PM ', 'private'), ('-!- ', 'notice'), ('!!! ', 'error')):
            if text.startswith(prefix):
                return '%s %s' % (stamp, self.paint(STYLES[style], text))
        return '%s %s' % (stamp, text)

    # Input ---------------------------------------------------------------------

    def feed(self, data):
        """Apply typed keys; the lines entered (None last when the user leaves)."""
        if not data:
            return [None]
        lines = []
        for key in self.keys.feed(data):
            if key.startswith('cursor_at '):  # the answer to on_wakeup's question
                self.redraw_resized(int(key.split()[1]))
                continue
            if key == 'redraw':
                self.scroll = 0
            if key == 'enter' and self.editor.query is None and self.too_long():
                continue
            text = self.editor.press(key)
            if text is LEAVE:
                lines.append(None)
                break
            if text is not None:  # Alt-Enter made several lines of it
                lines.extend(line for line in text.split('\n') if line.strip())
        self.editor.compose()
        self.write(self.input_line())
        return lines

    def too_long(self):
        """True (and say so) if a line typed is longer than a server takes:
        it stays in the editor to be cut, instead of being refused later."""
        longest = max(len(line.encode('utf-8', 'surrogateescape'))
                      for line in ''.join(self.editor.chars).split('\n'))
        if longest > self.max_line:
            self.show(['!!! line too long (%d bytes; at most %d): not sent'
                       % (longest, self.max_line)])
        return longest > self.max_line

    def input_line(self):
        """The prompt and as much of the typed line as fits, scrolled to keep
        the cursor in view, and the cursor put back where it belongs."""
        columns = self.columns()
        if self.editor.query is not None:
            prompt = "(search) '%s': " % cut_to_width(self.editor.query, columns // 2 - 14)
        else:  # the room we are in, and whether we are cut off
            prompt = cut_to_width(('(%s) ' % self.status if self.status else '')
                                  + (self.people.room or ''), columns // 2 - 2) + '> '
        room = max(2, columns - text_width(prompt) - 1)
        chars = [LINE_BREAK_SHOWN if ch == '\n' else ch for ch in self.editor.chars]
        cursor = self.editor.cursor
        widths = [char_width(ch) for ch in chars]
        self.scroll = min(self.scroll, cursor)
        before_cursor = sum(widths[self.scroll:cursor])
        while before_cursor > room - 1:
            before_cursor -= widths[self.scroll]
            self.scroll += 1
        end, used = self.scroll, 0
        while end < len(chars) and used + widths[end] <= room:
            used += widths[end]
            end += 1
        column = self.drawn_column = text_width(prompt) + before_cursor
        return ('\r' + self.paint(STYLES['prompt'], prompt) + ''.join(chars[self.scroll:end])
                + '\x1b[K\r' + ('\x1b[%dC' % column if column else ''))


# --- Security: TLS and passwords ------------------------------------------------

def fingerprint(der):
    """A certificate's SHA-256 fingerprint as openssl prints it: AB:CD:..."""
    return colon_hex(hashlib.sha256(der).hexdigest())


def colon_hex(digits):
    digits = digits.upper()
    return ':'.join(digits[i:i + 2] for i in range(0, len(digits), 2))


def fingerprint_arg(text):
    """An argparse type: a SHA-256 fingerprint, with or without colons, or as
    openssl prints it ("sha256 Fingerprint=AB:CD:...")."""
    digits = text.split('=')[-1].replace(':', '').strip()
    if not re.match(r'^[0-9A-Fa-f]{64}$', digits):
        raise argparse.ArgumentTypeError('not a SHA-256 fingerprint: %r' % text)
    return colon_hex(digits)


def server_tls(cert, key):
    """The server's TLS context, and its certificate's fingerprint."""
    context = tls_context(server_side=True)
    try:
        context.load_cert_chain(cert, key)
        with open(cert) as pem:
            der = ssl.PEM_cert_to_DER_cert(re.search(
                r'-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----', pem.read(),
                re.DOTALL).group(0))
    except (OSError, ValueError, AttributeError, ssl.SSLError) as exc:
        raise UserError('cannot use TLS certificate %s and key %s: %s'
                        % (cert, key, getattr(exc, 'strerror', None) or exc))
    return context, fingerprint(der)


def client_tls(sock, host, cafile=None, pinned=None):
    """Wrap a connected socket in TLS: verify the server against the system's
    CAs (or cafile) and its host name, or else against a pinned fingerprint.
    Nothing has been sent when this refuses the server.  (The TLS socket,
    what protects it.)"""
    context = tls_context(server_side=False)
    if pinned:  # a self-signed certificate: the fingerprint is the trust
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context.load_verify_locations(cafile) if cafile else context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise UserError('cannot read CA file %s: %s' % (cafile, exc))
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except (OSError, ValueError) as exc:  # 3.6: a wrong host name is a ValueError
        unverified = (getattr(exc, 'reason', None) == 'CERTIFICATE_VERIFY_FAILED'
                      or isinstance(exc, ssl.CertificateError))
        raise (NotVouchedFor if unverified else UserError)('TLS with %s failed: %s' % (
            host, getattr(exc, 'verify_message', None) or getattr(exc, 'reason', None) or exc))
    actual = fingerprint(tls.getpeercert(binary_form=True))
    if pinned and actual != pinned:
        tls.close()
        raise UserError('the server\'s certificate is %s, not the %s given: refusing to '
                        'talk to it' % (actual, pinned))
    version = tls.version().replace('TLSv', 'TLS ')
    return tls, '%s, certificate %s' % (version, 'pinned' if pinned else 'verified')


def trusted_tls(sock, host, port):
    """TLS as ssh does it (trust on first use): a server this computer has
    seen before must show the same certificate; a new one is trusted if a
    certificate authority vouches for it, or if the person at the terminal
    says so after comparing its fingerprint with the server's banner.  Then
    it is remembered in the known-hosts file."""
    where = printable_address((host, port))
    known = known_fingerprints().get(where)
    if known:
        try:
            return client_tls(sock, host, pinned=known)
        except UserError as exc:
            if 'refusing' not in str(exc):
                raise
            raise UserError(CHANGED_CERTIFICATE % (where, str(exc).split()[4], known,
                                                   known_hosts_path()))
    try:
        return client_tls(sock, host)
    except NotVouchedFor:
        sock.close()  # self-signed, most likely: look at it on a new connection
    sock = open_connection(host, port)
    context = tls_context(server_side=False)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        sock.close()
        raise UserError('TLS with %s failed: %s' % (host, getattr(exc, 'reason', None) or exc))
    shown = fingerprint(tls.getpeercert(binary_form=True))
    if not (os.isatty(0) and os.isatty(2)):
        tls.close()
        raise UserError('the certificate of %s is new to this computer (SHA-256 %s): check '
                        'it against the server\'s banner, then run again with '
                        '--tls-fingerprint %s' % (where, shown, shown))
    sys.stderr.write('The certificate of %s is new to this computer.\nSHA-256 fingerprint: '
                     '%s\nIs that the fingerprint the server printed? Trust it and remember '
                     'it [yes/no]? ' % (where, shown))
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ('y', 'yes'):
        tls.close()
        raise UserError('certificate not trusted')
    remember_fingerprint(where, shown)
    return tls, '%s, certificate pinned' % tls.version().replace('TLSv', 'TLS ')


CHANGED_CERTIFICATE = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@        WARNING: THE SERVER'S CERTIFICATE HAS CHANGED, NOT CONNECTING       @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
%s now shows the certificate with SHA-256 fingerprint
  %s
but this computer knows it by
  %s
Someone could be listening in.  If you know the server made a new
certificate, remove its line from %s and connect again."""


def config_dir():
    """Where chat.py keeps its files for this user: ~/.config/chat.py (or
    under $XDG_CONFIG_HOME), made private (0700) when first needed."""
    base = os.environ.get('XDG_CONFIG_HOME') or os.path.join(os.path.expanduser('~'), '.config')
    return os.path.join(base, 'chat.py')


def known_hosts_path():
    return os.path.join(config_dir(), 'known_hosts')


def known_fingerprints():
    """{'host:port': fingerprint} of the servers this computer trusts."""
    try:
        with open(known_hosts_path()) as handle:
            return dict(line.split()[:2] for line in handle if len(line.split()) >= 2
                        and not line.startswith('#'))
    except OSError:
        return {}


def remember_fingerprint(where, shown):
    """Add a server to the known-hosts file (one "host:port fingerprint" a
    line, as ssh keeps its known_hosts)."""
    os.makedirs(config_dir(), mode=0o700, exist_ok=True)
    with open(known_hosts_path(), 'a') as handle:
        handle.write('%s %s\n' % (where, shown))


def server_certificate(folder):
    """The server's own certificate and key in folder, made once (self-signed,
    with the openssl command) and kept, key private (0600), so that clients
    that trusted it once trust it again.  (cert, key, whether just made)"""
    cert, key = os.path.join(folder, 'server-cert.pem'), os.path.join(folder, 'server-key.pem')
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key, False
    openssl = shutil.which('openssl')
    if openssl is None:
        raise UserError('--tls needs a certificate: give --tls-cert and --tls-key, or install '
                        'the openssl command and chat.py will make one')
    os.makedirs(folder, mode=0o700, exist_ok=True)
    mask = os.umask(0o077)  # the key is born private
    try:
        result = subprocess.run(
            [openssl, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
             '-nodes', '-days', '3650', '-subj', '/CN=chat.py', '-keyout', key + '.new',
             '-out', cert + '.new'], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, universal_newlines=True)
    finally:
        os.umask(mask)
    if result.returncode != 0:
        raise UserError('openssl could not make a certificate: %s'
                        % (result.stderr.strip().splitlines() or ['?'])[-1])
    os.replace(key + '.new', key)
    os.replace(cert + '.new', cert)
    return cert, key, True


def environment(name):
    """An environment variable's text, as UTF-8 whatever the locale (under
    LC_ALL=C, 3.6 would decode it as ASCII); None if it is not set."""
    environb = getattr(os, 'environb', None)
    if environb is None:  # Windows: the environment is text already
        return os.environ.get(name)
    value = environb.get(name.encode())
    try:
        return None if value is None else value.decode('utf-8')
    except UnicodeDecodeError:
        raise UserError('%s is not valid UTF-8' % name)


def read_secret(path, variable):
    """A password from the first line of a file (UTF-8, a byte-order mark
    ignored), or an environment variable (never the command line, which ps
    shows to everyone); None if neither is given."""
    if path is None:
        secret = environment(variable)
        if secret == '':
            raise UserError('%s is set but empty' % variable)
        return secret
    try:
        with open(path, 'rb') as handle:
            first = handle.readline()
    except OSError as exc:
        raise UserError('cannot read password file %s: %s' % (path, exc.strerror))
    try:
        secret = first.decode('utf-8-sig').rstrip('\r\n')  # Notepad's BOM stripped
    except UnicodeDecodeError:
        raise UserError('password file %s is not UTF-8 text' % path)
    if not secret:
        raise UserError('password file %s is empty' % path)
    return secret


def read_motd(path):
    """The message of the day: the lines of a UTF-8 file, cleaned of control
    characters (each will be a notice), blank ones at the ends dropped."""
    if path is None:
        return []
    try:
        with open(path, 'rb') as handle:
            data = handle.read(MAX_MOTD_BYTES + 1)
        if len(data) > MAX_MOTD_BYTES:  # its first lines, not half a character
            data = data[:data.rfind(b'\n', 0, MAX_MOTD_BYTES) + 1]
        text = data.decode('utf-8-sig')
    except OSError as exc:
        raise UserError('cannot read MOTD file %s: %s' % (path, exc.strerror))
    except UnicodeDecodeError:
        raise UserError('MOTD file %s is not UTF-8 text' % path)
    lines = [tidy(line) for line in text.splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return lines


def usable_secret(secret, where):
    """secret, if /pass can carry it: no spaces at its ends (commands are
    trimmed), no runs of spaces or control characters (lines are tidied)."""
    if secret is not None and (secret != secret.strip() or tidy(secret) != secret):
        raise UserError('the password in %s has spaces at its ends, long runs of spaces '
                        'or control characters, which /pass cannot carry' % where)
    return secret


def hash_password(password):
    """A salted slow hash of password, as DIR/people.log keeps it: the method
    and its cost, the salt and the digest, "$" between them, so that a hash
    is checked with the cost it was made with.  scrypt where hashlib has it
    (Python built with OpenSSL 1.1 or newer), else PBKDF2-SHA256."""
    kind, cost = ('scrypt', SCRYPT_COST) if hasattr(hashlib, 'scrypt') else (
        'pbkdf2-sha256', (PBKDF2_ROUNDS,))
    salt = os.urandom(16)
    digest = derive_key(kind, cost, password, salt, 32)
    return '%s$%s$%s' % (':'.join([kind] + [str(number) for number in cost]),
                         base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def derive_key(kind, cost, password, salt, size):
    """The slow hash of password by a method of hash_password()."""
    secret = password.encode('utf-8', 'surrogateescape')
    if kind == 'scrypt':
        n, r, p = cost
        return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p,
                              maxmem=max(64 << 20, 256 * n * r * p), dklen=size)
    return hashlib.pbkdf2_hmac('sha256', secret, salt, cost[0], size)


def password_matches(password, stored):
    """True if password is the one stored (a hash_password() text); None if
    this Python cannot tell (an scrypt hash, and hashlib without scrypt)."""
    try:
        method, salt, digest = stored.split('$')
        kind, *cost = method.split(':')
        cost = [int(number) for number in cost]
        salt, digest = base64.b64decode(salt), base64.b64decode(digest)
        if kind not in ('scrypt', 'pbkdf2-sha256'):
            return False
        if kind == 'scrypt' and not hasattr(hashlib, 'scrypt'):
            return None
        got = derive_key(kind, cost, password, salt, len(digest))
    except ValueError:  # a damaged hash (binascii.Error is one) matches nothing
        return False
    return hmac.compare_digest(got, digest)


def authenticate(sock, first_line=''):
    """Open the conversation: an empty line first (or first_line, such as
    a /resume), so the server need not wait to tell us from a browser.  If the server then asks for the room
    password, give it: from CHAT_PASSWORD, or asked for on the terminal
    without echo.  The bytes read past it, which are the client's to show.
    Every wait has one deadline and reads at most CLIENT_MAX_LINE_BYTES: a
    server that trickles bytes or never ends a line cannot hang the client
    or fill its memory."""
    received = bytearray()

    def next_line(deadline, needed=True):
        """The server's next line (decoded); None if none came in time and
        it was not needed."""
        while b'\n' not in received and len(received) <= CLIENT_MAX_LINE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                if needed:
                    raise UserError('the server did not answer')
                return None
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            if not data:
                if needed:
                    raise UserError('the server closed the connection')
                return None
            received.extend(data)
        end = received.find(b'\n')
        if end < 0:
            raise UserError('the server sent a line longer than %d bytes'
                            % CLIENT_MAX_LINE_BYTES)
        line = decode(bytes(received[:end]))
        del received[:end + 1]
        return line
    sock.sendall(first_line.encode() + b'\n')
    # The first line: a welcome, or the password prompt, or (from a server
    # that is not chat.py and never speaks first) nothing for a while.
    first = next_line(time.monotonic() + FIRST_LINE_WAIT_SEC, needed=False)
    sock.settimeout(CONNECT_TIMEOUT_SEC)
    if first is None or not first.startswith('-!- ' + PASSWORD_PROMPT.split(':')[0]):
        if first is not None:
            received[:0] = first.encode() + b'\n'
        return bytes(received)
    secret = environment('CHAT_PASSWORD')
    from_environment = secret is not None
    for _ in range(PASSWORD_TRIES):
        if secret is None:
            if not os.isatty(0):
                raise UserError('this room needs a password: set CHAT_PASSWORD')
            secret = getpass.getpass('Password for the room: ')
        # A terminal in another locale may give undecodable bytes: pass them on.
        sock.sendall(('/pass %s\n' % secret).encode('utf-8', 'surrogateescape'))
        reply = next_line(time.monotonic() + CONNECT_TIMEOUT_SEC)
        if reply == '-!- ' + PASSWORD_ACCEPTED:
            sock.settimeout(CONNECT_TIMEOUT_SEC)
            return bytes(received)
        if from_environment:
            raise UserError('CHAT_PASSWORD is not the room\'s password')
        if reply.endswith('goodbye'):
            raise UserError(reply.lstrip('!- '))
        print('chat.py: %s' % reply.lstrip('!- '), file=sys.stderr)
        secret = None
    raise UserError('wrong password')


# --- Bench -------------------------------------------------------------------

BENCH_MARK = b'~'          # in every bench message once, and in nothing else the
BENCH_TIMED = b'~T '       # server sends (names cannot hold it): receivers count
# messages with one C-speed count of a byte.  Some messages also carry their
# send time ("~T SENDER SEQ MICROSECONDS"); the first in each read is timed.
BENCH_READ_BYTES = 256 * 1024
BENCH_SETTLE_SEC = 0.3     # the room is quiet after joins once this passes silently
BENCH_QUIET_SEC = 1.0      # a slow client the server kept stops receiving: nothing for this long
BENCH_PROGRESS_SEC = 2.0
BENCH_STALL_SEC = 5.0      # give up when nothing has arrived for this long
BENCH_WINDOW_BYTES = MAX_BACKLOG_BYTES // 2  # in flight to each receiver: the
# load is closed-loop, so a server faster than this process's reading cannot
# make it a slow consumer that the server rightly cuts off.


class BenchConn:
    """One load-generator connection: what it has to send, what it got."""

    __slots__ = ('sock', 'index', 'connected', 'greeted', 'bytes', 'outbuf', 'seq', 'closed')

    def __init__(self, sock, index):
        self.sock = sock
        self.index = index
        self.connected = self.greeted = self.closed = False
        self.bytes = 0            # bytes received in all
        self.outbuf = bytearray()
        self.seq = 0              # messages it has sent


class Bench:
    """A fan-out load generator on one selector: connects clients, lets some
    of them send, and counts and times what reaches the others."""

    def __init__(self, addresses, args, server_pid=None, out=None):
        self.addresses = addresses    # (family, address) of each server: clients take turns
        self.args = args
        self.server_pid = server_pid
        self.out = out or sys.stdout
        self.selector = selectors.DefaultSelector()
        self.conns = []
        self.latencies = []           # seconds, sampled
        self.delivered = 0            # bench messages received, by all clients
        self.buffer = bytearray(BENCH_READ_BYTES)  # every read lands here
        self.last_progress = time.monotonic()

    # Phases ------------------------------------------------------------------

    def run(self):
        """Connect, load, report; the exit status (1 if anything was lost)."""
        args = self.args
        baseline = proc_memory(self.server_pid)
        connect_time, greet_lag, join_bytes = self.connect_all(args.clients)
        idle_memory = proc_memory(self.server_pid)
        slow = [self.open_slow() for _ in range(args.slow)]
        self.say('connect:    %d connections in %.2f s; the last greeted %.3f s after '
                 'the last connect; %s of joins (%.0f per client)'
                 % (args.clients, connect_time, greet_lag, human_bytes(join_bytes),
                    join_bytes / args.clients))
        if baseline and idle_memory:
            self.say('memory:     server %s at start, %s with %d idle connections '
                     '(%+.2f KiB each)' % (human_bytes(baseline[0]), human_bytes(idle_memory[0]),
                                           args.clients,
                                           (idle_memory[0] - baseline[0]) / 1024 / args.clients))
        cpu_start = proc_cpu_seconds(self.server_pid)
        if args.idle:
            lost = self.broadcast_once()
        else:
            lost = self.load(args.senders, args.messages, args.size, args.rate)
            cpu = proc_cpu_seconds(self.server_pid)
            if cpu is not None:
                self.say('server CPU: %.2f s, %.3f s per million deliveries' % (
                    cpu - cpu_start, (cpu - cpu_start) / max(self.delivered, 1) * 1e6))
        peak = proc_memory(self.server_pid)
        if peak:
            self.say('server mem: %s now, %s peak' % (human_bytes(peak[0]), human_bytes(peak[1])))
        if slow:
            cut = closed_count(slow, BENCH_QUIET_SEC)
            self.say('slow:       %d clients that never read; the server cut off %d'
                     % (len(slow), cut))
        return 1 if lost else 0

    def connect_all(self, count):
        """Open count connections at once; wait until each is greeted and
        the joins have died down.  (seconds to connect, greeting lag after
        the last connect, bytes the server sent meanwhile)"""
        started = time.monotonic()
        last_connect = started
        for index in range(count):
            family, address = self.addresses[index % len(self.addresses)]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise UserError('bench: cannot connect to %s: %s'
                                % (printable_address(address), os.strerror(error)))
            conn = BenchConn(sock, index)
            conn.outbuf += self.hello()
            self.conns.append(conn)
            self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        last_greeted = None
        deadline = started + self.args.timeout
        while time.monotonic() < deadline:
            self.pump(1.0)
            connected = sum(c.connected for c in self.conns)
            greeted = sum(c.greeted for c in self.conns)
            if connected == count and last_connect == started:
                last_connect = time.monotonic()
            if greeted == count:
                last_greeted = time.monotonic()
                break
            self.progress('connecting: %d of %d connected, %d greeted' % (connected, count, greeted))
        if last_greeted is None:
            raise UserError('bench: only %d of %d connections were greeted within %d s'
                            % (sum(c.greeted for c in self.conns), count, self.args.timeout))
        self.settle()
        return last_connect - started, last_greeted - last_connect, sum(c.bytes for c in self.conns)

    def settle(self):
        """Read until the server has been quiet for BENCH_SETTLE_SEC (bounded)."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and self.pump(BENCH_SETTLE_SEC):
            pass
        self.delivered, self.latencies = 0, []  # (a server's history of an earlier run)

    def hello(self):
        """What a client says first: an empty line, as chat.py client does (no
        wait to be told from a browser), or a WebSocket handshake."""
        if not self.args.websocket:
            return b'\n'
        return ('GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n'
                'Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13'
                '\r\n\r\n' % base64.b64encode(os.urandom(16)).decode()).encode()

    def open_slow(self):
        """A client that joins, reads its first line (so it is surely in the
        room when the load starts), and never reads again."""
        family, address = self.addresses[-1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(self.args.timeout)
        sock.connect(address)
        sock.sendall(self.hello())
        byte = None
        try:
            while byte != b'\n':
                byte = sock.recv(1)
                if not byte:
                    raise UserError('bench: the server closed a slow client at once')
        except socket.timeout:
            raise UserError('bench: a slow client was not greeted within %d s'
                            % self.args.timeout)
        return sock

    def broadcast_once(self):
        """One message from the first client to all the others: how long until
        the last has it.  The number lost."""
        first = self.conns[0]
        started = time.monotonic()
        first.outbuf += self.messages(first, 1, self.args.size, started)
        self.send(first)
        expected = len(self.conns) - 1
        deadline = started + self.args.timeout
        while self.delivered < expected and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        elapsed = time.monotonic() - started
        lost = expected - self.delivered
        self.say('broadcast:  1 message reached %d clients in %.1f ms (lost %d)'
                 % (self.delivered, elapsed * 1000, lost))
        return lost

    def load(self, senders, per_sender, size, rate):
        """senders clients send per_sender messages each (at rate per second
        each, or as fast as the server takes them); everyone else counts.
        The number lost."""
        senders = self.conns[:senders]
        receivers = len(self.conns) - 1
        expected = len(senders) * per_sender * receivers
        window = max(1, BENCH_WINDOW_BYTES // (size + 2 * MAX_NAME_CHARS))  # messages
        started = time.monotonic()
        deadline = started + self.args.timeout
        last_delivery = started
        while time.monotonic() < deadline and time.monotonic() - last_delivery < BENCH_STALL_SEC:
            now = time.monotonic()
            sent = sum(conn.seq for conn in senders)
            room = window - (sent - self.delivered // receivers)
            for conn in senders:
                due = min(per_sender - conn.seq, room)
                if rate:
                    due = min(due, int((now - started) * rate) + 1 - conn.seq)
                if due > 0 and len(conn.outbuf) < READ_CHUNK_BYTES:
                    batch = due if rate else min(due, max(1, READ_CHUNK_BYTES // size))
                    conn.outbuf += self.messages(conn, batch, size, now)
                    room -= batch
                    self.send(conn)
            before = self.delivered
            self.pump(min(1.0 / rate, 0.05) if rate else 0.05)
            if self.delivered > before:
                last_delivery = time.monotonic()
            if self.delivered >= expected:
                break
            self.progress('load: %d of %d deliveries' % (self.delivered, expected))
        delivered = self.delivered
        elapsed = last_delivery - started
        self.say('load:       %d senders x %d messages of %d bytes to %d clients%s'
                 % (len(senders), per_sender, size, len(self.conns),
                    ', %g/s each' % rate if rate else ', as fast as possible'))
        self.say('deliveries: %d in %.2f s = %s/s (lost %d)'
                 % (delivered, elapsed, human_count(delivered / max(elapsed, 1e-9)),
                    expected - delivered))
        self.say_latency()
        cut = sum(conn.closed for conn in self.conns)
        if cut:
            self.say('closed:     the server closed %d of the clients' % cut)
        return expected - delivered

    # Sending and receiving -----------------------------------------------------

    def messages(self, conn, count, size, now):
        """count bench lines of size bytes from conn; the first carries the time."""
        lines = []
        for i in range(count):
            conn.seq += 1
            if i == 0:
                head = '~T %d %d %d ' % (conn.index, conn.seq, int(now * 1e6))
            else:
                head = '~ %d %d ' % (conn.index, conn.seq)
            lines.append(head + 'x' * max(0, size - 1 - len(head)) + '\n')
        if self.args.websocket:  # a frame each; the mask is zeros, so no XOR to pay
            return b''.join(frame_head(OP_TEXT, len(line) - 1, masked=True) + b'\0\0\0\0'
                            + line[:-1].encode() for line in lines)
        return ''.join(lines).encode()

    def send(self, conn):
        try:
            sent = send_some(conn.sock, conn.outbuf)
        except OSError:
            conn.closed = True
            return
        del conn.outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self.selector.modify(conn.sock, events, conn)

    def pump(self, timeout):
        """Handle whatever happens within timeout; True if anything arrived.
        Arrivals are timed when select() reports them, so the time this
        process spends on the sockets before them is not charged to the
        server."""
        arrived = False
        events = self.selector.select(timeout)
        now = time.monotonic()
        for key, mask in events:
            conn = key.data
            if mask & selectors.EVENT_WRITE:
                if not conn.connected:
                    error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise UserError('bench: cannot connect to %s: %s'
                                        % (printable_address(self.addresses[
                                            conn.index % len(self.addresses)][1]),
                                           os.strerror(error)))
                    conn.connected = True
                self.send(conn)
            if mask & selectors.EVENT_READ:
                arrived = self.receive(conn, now) or arrived
        return arrived

    def receive(self, conn, now):
        """Count the bench messages in what arrived; time the first timed one."""
        data = self.buffer
        try:
            size = conn.sock.recv_into(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            size = 0
        if not size:
            conn.closed = True
            self.selector.unregister(conn.sock)
            return False
        conn.bytes += size
        conn.greeted = conn.greeted or data.find(b'\n', 0, size) >= 0
        self.delivered += data.count(BENCH_MARK, 0, size)
        end_mark = b'\n'
        if self.args.websocket:
            if self.args.size + 3 + MAX_NAME_CHARS >= 126:  # "<NAME> " and the line:
                # a frame this long has a 16-bit length, whose first byte is "~"
                self.delivered -= data.count(b'\x81~', 0, size)
            end_mark = b'\x81'  # a timed line ends where the next frame starts
        start = data.find(BENCH_TIMED, 0, size)
        end = data.find(end_mark, start, size) if start >= 0 else -1
        if end >= 0:  # else the line goes on in the next read: skip it
            self.latencies.append(now - int(data[start:end].split(b' ', 4)[3]) / 1e6)
        return True

    # Reporting -----------------------------------------------------------------

    def say(self, line):
        print(line, file=self.out, flush=True)

    def progress(self, line):
        now = time.monotonic()
        if now - self.last_progress >= BENCH_PROGRESS_SEC:
            self.last_progress = now
            print('... ' + line, file=sys.stderr, flush=True)

    def say_latency(self):
        samples = sorted(self.latencies)
        if not samples:
            return
        def at(fraction):
            return samples[min(len(samples) - 1, int(fraction * len(samples)))] * 1000
        self.say('latency:    p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms  (%d samples)'
                 % (at(0.5), at(0.9), at(0.99), samples[-1] * 1000, len(samples)))


def proc_cpu_seconds(pid):
    """User plus system CPU seconds of a local process, or None (Linux only)."""
    try:
        with open('/proc/%d/stat' % pid) as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def proc_memory(pid):
    """(resident, peak resident) bytes of a local process, or None (Linux only)."""
    try:
        with open('/proc/%d/status' % pid) as status:
            fields = dict(line.split(':', 1) for line in status)
        return tuple(int(fields[key].split()[0]) * 1024 for key in ('VmRSS', 'VmHWM'))
    except (OSError, TypeError, KeyError, ValueError):
        return None


def closed_count(socks, quiet_sec):
    """How many of socks their peer has closed.  A server that closes a
    socket with bytes still in its kernel's send buffer sends its FIN after
    them, so read them all at once until each ends or none has had anything
    for quiet_sec."""
    closed, selector = 0, selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    ready = True
    while selector.get_map() and ready:
        ready = selector.select(quiet_sec)
        for key, _ in ready:
            try:
                ended = not key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                ended = True
            if ended:
                closed += 1
                selector.unregister(key.fileobj)
    selector.close()
    return closed


def human_count(number):
    return '%.2fM' % (number / 1e6) if number >= 1e6 else '%.0f' % number


def human_bytes(count):
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if count < 1024 or unit == 'GiB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (count, unit)
        count /= 1024


def bench_address(host, port):
    """(family, address) of a server to measure."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip('[]'), port, 0, socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError('cannot find host %s: %s' % (host, exc.strerror))
    return family, address


def start_local_server(data=None):
    """A chat.py server in a child process on a free loopback port, flood
    control off (and its history in data, if given), for the bench to
    measure.  (process, port)"""
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), 'server', '0', '--host', '127.0.0.1',
         '--rate', '0', '--quiet'] + (['--data', data] if data else []),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, universal_newlines=True)
    banner = server.stdout.readline()
    port = banner.split('listening on 127.0.0.1:')[-1].split()[0] if 'listening' in banner else ''
    if not port.isdigit():
        server.kill()
        server.wait()
        raise UserError('bench: the local server did not start')
    return server, int(port)


# --- Command line ------------------------------------------------------------

class UserError(Exception):
    """Something the user can fix; main() prints it as one line."""


class NotVouchedFor(UserError):
    """No certificate authority vouches for the server's TLS certificate."""


def port_number(text):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError('not a port number: %r' % text)
    return port


def at_least(minimum, kind=int):
    """An argparse type: a number no smaller than minimum."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value < float('inf'):  # NaN fails both
            raise argparse.ArgumentTypeError('expected a number >= %s, got %r' % (minimum, text))
        return value
    return parse


def network_arg(text):
    """An argparse type: an IPv4 or IPv6 address or CIDR network."""
    network = parse_network(text)
    if network is None:
        raise argparse.ArgumentTypeError('not an address or network: %r' % text)
    return network


def byte_size(text):
    """An argparse type: bytes, with an optional K or M suffix (KiB, MiB)."""
    scale = {'K': 1024, 'M': 1024 * 1024}.get(text[-1:].upper(), 1)
    return at_least(1)(text[:-1] if scale > 1 else text) * scale


def add_address_arguments(parser, host_help):
    """HOST [PORT], as words or as --host and --port (people guess both)."""
    parser.add_argument('host', nargs='?', help=host_help)
    parser.add_argument('port', nargs='?', type=port_number,
                        help='its port (default %d; or --port)' % DEFAULT_PORT)
    parser.add_argument('--host', dest='host_flag', help=argparse.SUPPRESS)
    parser.add_argument('--port', dest='port_flag', type=port_number, help=argparse.SUPPRESS)


def server_address(args, default_host):
    """(host, port) from HOST [PORT], HOST:PORT, [IPV6]:PORT, --host and
    --port, whichever were used; the same thing given twice must agree."""
    host, inline_port = split_host_port(args.host) if args.host else (None, None)
    host = one_of('host', host, args.host_flag)
    port = one_of('port', inline_port, args.port, args.port_flag)
    return host or default_host, DEFAULT_PORT if port is None else port


def split_host_port(text):
    """'HOST', 'HOST:PORT' or '[IPV6]:PORT' as (host, port or None); a bare
    IPv6 address (more than one colon) is a host."""
    match = re.match(r'^\[([^\]]*)\](?::(.*))?$', text)
    if match:
        host, port = match.groups()
    elif text.count(':') == 1:
        host, port = text.split(':')
    else:
        host, port = text, None
    if port is None:
        return host, None
    try:
        return host, port_number(port)
    except argparse.ArgumentTypeError as exc:
        raise UserError(str(exc))


def one_of(what, *given):
    """The value given for what, however it was given, or None."""
    values = [value for value in given if value is not None]
    if len(set(values)) > 1:
        raise UserError('two different %ss given: %s' % (what, ' and '.join(map(str, values))))
    return values[0] if values else None


COMMANDS = ('server', 'client', 'bench')


def build_parser():
    parser = argparse.ArgumentParser(
        prog='chat.py', description='A chat server and client in one file. '
        'Start a server, then join it with the client, nc or telnet.')
    parser.add_argument('--version', action='version', version='chat.py ' + __version__)
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.required = True  # 3.6: add_subparsers(required=True) raises

    server = commands.add_parser('server', help='run a chat server',
                                 description='Run a chat server.')
    server.set_defaults(run=run_server)
    server.add_argument('port', nargs='?', type=port_number,
                        help='TCP port (default %d; 0 picks a free one; or --port)' % DEFAULT_PORT)
    server.add_argument('--port', type=port_number, dest='port_flag', help=argparse.SUPPRESS)
    server.add_argument('--host', help='address or name to listen on '
                        '(default: all interfaces, IPv4 and IPv6)')
    server.add_argument('--history', type=at_least(0), default=DEFAULT_HISTORY, metavar='N',
                        help='public messages replayed to newcomers (default %(default)s)')
    server.add_argument('--resume-for', type=at_least(0, float), default=DEFAULT_RESUME_FOR,
                        metavar='SECONDS', help='a lost connection keeps its name and room '
                        'this long, to come back with /resume (default 600; 0: never)')
    server.add_argument('--data', metavar='DIR', help='keep every room\'s public lines and '
                        'topic in DIR/%s, reloaded at start (default: in memory only)'
                        % DATA_LOG_NAME)
    server.add_argument('--fsync', choices=FSYNC_CHOICES, default='everysec',
                        help='with --data: sync the log to disk after every write, once a '
                        'second, or when the system likes (default %(default)s)')
    server.add_argument('--data-max', type=byte_size, default=DEFAULT_DATA_MAX, metavar='SIZE',
                        help='with --data: compact the log past this size (default 64M)')
    server.add_argument('--redis', metavar='URL', help='be one chat with every server on '
                        'this Redis: redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss:// for '
                        'TLS (or set CHAT_REDIS_URL, which keeps the password out of ps)')
    server.add_argument('--cluster', type=cluster_name, default=DEFAULT_CLUSTER, metavar='NAME',
                        help='with --redis: the prefix of its keys, so that two chats can '
                        'share one Redis (default %(default)s)')
    server.add_argument('--redis-cafile', metavar='FILE', help='with rediss://: trust these '
                        'CAs for Redis\'s certificate (default: the system\'s)')
    server.add_argument('--redis-optional', action='store_true', help='with --redis: start '
                        'even if Redis cannot be reached, alone until it can')
    server.add_argument('--max-line', type=byte_size, default=MAX_LINE_BYTES, metavar='BYTES',
                        help='longest line a peer may send (default %(default)s)')
    server.add_argument('--max-backlog', type=byte_size, default=MAX_BACKLOG_BYTES,
                        metavar='BYTES', help='unsent output after which a peer is '
                        'disconnected as too slow (default 256K)')
    server.add_argument('--rate', type=at_least(0, float), default=RATE_LINES_PER_SEC,
                        metavar='LINES', help='lines per second a peer may send after '
                        'its burst; faster input waits (default %(default)s; 0: no limit)')
    server.add_argument('--burst', type=at_least(1), default=RATE_BURST_LINES, metavar='N',
                        help='lines a peer may send at once (default %(default)s)')
    server.add_argument('--max-clients', type=at_least(1), metavar='N',
                        help='connections at once (default: what the open-files limit allows)')
    server.add_argument('--quiet', action='store_true', help='log nothing')
    server.add_argument('--no-web', action='store_true', help='no web page and no '
                        'WebSocket on the port: HTTP requests are closed unheard')
    server.add_argument('--web-origin', action='append', default=[], metavar='ORIGIN',
                        help='another origin whose pages may open the WebSocket, such as '
                        'https://chat.example.org (repeatable)')
    server.add_argument('--metrics', action='store_true', help='serve GET /metrics in '
                        "Prometheus's text format (off: it tells the world how busy you are)")
    server.add_argument('--motd', metavar='FILE', help='a message of the day from FILE, shown '
                        'to every newcomer and on /motd (SIGHUP reads it again)')
    server.add_argument('--tls', action='store_true', help='speak TLS, with a certificate '
                        'made once and kept in %s' % config_dir().replace(
                            os.path.expanduser('~'), '~'))
    server.add_argument('--tls-cert', metavar='FILE', help='speak TLS with this certificate '
                        '(PEM), and --tls-key')
    server.add_argument('--tls-key', metavar='FILE', help='the private key (PEM)')
    server.add_argument('--password-file', metavar='FILE', help='the room password, from '
                        'the first line of FILE (or set CHAT_PASSWORD)')
    server.add_argument('--op-password-file', metavar='FILE', help='the operator password '
                        '(or set CHAT_OP_PASSWORD)')
    server.add_argument('--allow', action='append', type=network_arg, default=[],
                        metavar='CIDR', help='accept only addresses in CIDR (repeatable)')
    server.add_argument('--deny', action='append', type=network_arg, default=[],
                        metavar='CIDR', help='refuse addresses in CIDR (repeatable; wins)')
    server.add_argument('--max-per-address', type=at_least(0), default=MAX_PER_ADDRESS,
                        metavar='N', help='connections at once from one address, loopback '
                        'aside (default %(default)s; 0: no limit)')

    client = commands.add_parser('client', help='join a chat server',
                                 description='Join a chat server. Lines you type are sent; '
                                 'at the end of input the client leaves.')
    client.set_defaults(run=run_client)
    add_address_arguments(client, 'server name or address, HOST:PORT or [IPV6]:PORT '
                          '(default localhost)')
    client.add_argument('--name', '--nick', help='the name to ask for (default: your login '
                        'name); a registered one takes its password from '
                        'CHAT_NAME_PASSWORD, or asks for it')
    client.add_argument('--room', help='the room to join (default: the lobby)')
    client.add_argument('--history', action='store_true', help='piped, print the recent '
                        'lines the server replays on joining too (a terminal always shows them)')
    client.add_argument('--reconnect', action='store_true', help='piped, come back after a '
                        'lost connection as a terminal client does (resuming where it was)')
    client.add_argument('--no-color', action='store_true',
                        help='no colours on a terminal (as does setting NO_COLOR)')
    client.add_argument('--tls', action='store_true', help='speak TLS: trust the server if '
                        'a certificate authority vouches for it, or (asked once, like ssh) '
                        'if its fingerprint is the one it printed')
    client.add_argument('--cafile', metavar='FILE', help='with TLS, trust these CAs instead')
    client.add_argument('--tls-fingerprint', type=fingerprint_arg, metavar='SHA256',
                        help='speak TLS and trust the certificate with this fingerprint '
                        '(as the server prints it)')

    bench = commands.add_parser(
        'bench', help='measure a server under load',
        description='Measure a chat server: connect clients, let some of them send, '
        'and report deliveries per second, latency and losses. With no HOST it '
        'starts its own server (flood control off) on a free loopback port.')
    bench.set_defaults(run=run_bench)
    add_address_arguments(bench, 'server to measure, HOST:PORT or [IPV6]:PORT (default: '
                          'start one)')
    bench.add_argument('--clients', type=at_least(2), default=100, metavar='N',
                       help='connections (default %(default)s)')
    bench.add_argument('--senders', type=at_least(1), default=10, metavar='N',
                       help='how many of them send (default %(default)s)')
    bench.add_argument('--messages', type=at_least(1), metavar='N', help='messages per '
                       'sender (default: 10 million deliveries in all, or 5 s at --rate)')
    bench.add_argument('--size', type=at_least(40), default=64, metavar='BYTES',
                       help='bytes per message, newline included (default %(default)s)')
    bench.add_argument('--rate', type=at_least(0, float), default=0, metavar='N',
                       help='messages per second per sender (default: as fast as possible)')
    bench.add_argument('--idle', action='store_true', help='only connect the clients, '
                       'then time one message to all of them')
    bench.add_argument('--slow', type=at_least(0), default=0, metavar='N',
                       help='extra clients that never read (default %(default)s)')
    bench.add_argument('--timeout', type=at_least(1), default=60, metavar='SECONDS',
                       help='give up on any phase after this long (default %(default)s)')
    bench.add_argument('--websocket', action='store_true', help='the clients speak '
                       'WebSocket (as the web page does) instead of plain lines')
    bench.add_argument('--data', action='store_true', help='the server it starts keeps its '
                       'history in a temporary --data folder (with --fsync everysec)')
    bench.add_argument('--servers', metavar='HOST:PORT,...', help='spread the clients over '
                       'these servers (linked with --redis), each taking turns')
    bench.add_argument('--server-pid', type=at_least(1), metavar='PID',
                       help='a local server process to report CPU and memory for')
    return parser


def run_server(args):
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError('--tls-cert and --tls-key go together')
    cert, key, log = args.tls_cert, args.tls_key, make_log(args.quiet)
    if args.tls and not cert:
        cert, key, made = server_certificate(config_dir())
        log('%s a TLS certificate in %s' % ('made' if made else 'using', cert))
    tls, cert_fingerprint = server_tls(cert, key) if cert else (None, None)
    raise_open_files_limit()
    data = DataLog(args.data, args.fsync, args.data_max, log) if args.data else None
    port = one_of('port', args.port, args.port_flag)
    listeners = open_listeners(args.host, DEFAULT_PORT if port is None else port)
    def settings():  # read at start, and again on SIGHUP
        return (read_motd(args.motd),
                usable_secret(read_secret(args.password_file, 'CHAT_PASSWORD'),
                              args.password_file or 'CHAT_PASSWORD'),
                usable_secret(read_secret(args.op_password_file, 'CHAT_OP_PASSWORD'),
                              args.op_password_file or 'CHAT_OP_PASSWORD'))
    motd, password, op_password = settings()
    link = redis_link(args, log)
    server = Server(listeners, log=log, history=args.history,
                    max_line=args.max_line, max_backlog=args.max_backlog,
                    rate=args.rate, burst=args.burst, max_clients=args.max_clients, tls=tls,
                    password=password, op_password=op_password,
                    allow=args.allow, deny=args.deny, max_per_address=args.max_per_address,
                    console=console_in_foreground(), motd=motd, settings=settings,
                    web=not args.no_web, web_origins=args.web_origin, metrics=args.metrics,
                    data=data, resume_for=args.resume_for, link=link)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    if hasattr(signal, 'SIGHUP'):  # POSIX: reload without dropping anyone
        signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    print(server_banner(listeners, cert_fingerprint, server.gate.password is not None,
                        server.gate.op_password is not None, server.web is not None),
          flush=True)
    server.serve_forever()
    return 0


def redis_link(args, log):
    """The Link for --redis (or CHAT_REDIS_URL), or None.  Redis must be
    reachable at start, unless --redis-optional."""
    given = args.redis or os.environ.get('CHAT_REDIS_URL')
    if not given:
        for option in ('redis_cafile', 'redis_optional'):
            if getattr(args, option):
                raise UserError('--%s goes with --redis' % option.replace('_', '-'))
        return None
    url = parse_redis_url(given)
    tls = None
    if url.tls:
        if ssl is None:
            raise UserError('this Python has no ssl module: use redis://')
        tls = ssl.create_default_context(cafile=args.redis_cafile)
    address = redis_address(url)
    try:
        check_redis(url, address, tls, bus_channel(args.cluster, url.db))
    except UserError as exc:
        if not args.redis_optional:
            raise
        log('%s; alone until it can be reached (--redis-optional)' % exc)
    return Link(url, address, args.cluster, tls)


def cluster_name(text):
    if not re.match(r'[A-Za-z0-9_.:-]{1,64}\Z', text):
        raise argparse.ArgumentTypeError('a cluster name is 1-64 letters, digits and _.:-')
    return text


def console_in_foreground():
    """True if the server owns its terminal: started in the foreground.  A
    server put in the background later must not stop on reading it
    (SIGTTIN): the read then fails instead, and the console closes."""
    if os.name != 'posix' or not sys.stdin.isatty():
        return False
    try:
        if os.tcgetpgrp(sys.stdin.fileno()) != os.getpgrp():
            return False
    except OSError:
        return False
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    return True


def run_client(args):
    name = args.name if args.name is not None else default_name()
    name_password = usable_secret(read_secret(None, 'CHAT_NAME_PASSWORD'), 'CHAT_NAME_PASSWORD')
    host, port = server_address(args, 'localhost')
    sock, protection = connect(host, port, args.tls, args.cafile, args.tls_fingerprint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: the terminal is restored
    # Ctrl-C leaves, even if whatever started us ignores it (a background job's
    # SIGINT is ignored, and Python then raises no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        received = authenticate(sock)
        with open_screen(args.no_color) as screen:
            screen.note('connected to %s: %s' % (printable_address((host, port)), protection))
            history = args.history or screen.wakeup is not None  # a terminal shows it

            def redial(first_line):
                again, _ = connect(host, port, args.tls, args.cafile, args.tls_fingerprint)
                try:
                    return again, authenticate(again, first_line)
                except BaseException:
                    again.close()
                    raise
            if not (args.reconnect or screen.wakeup is not None):
                redial = None
            return Client(sock, screen, name=name, received=received, history=history,
                          room=args.room, redial=redial, name_password=name_password).run()
    finally:
        sock.close()


def open_screen(no_color):
    """The line editor when standard input and output are a terminal (and
    the terminal can be driven: POSIX), else plain lines in and out."""
    if termios is not None and os.isatty(0) and os.isatty(1):
        return TerminalScreen(0, 1, colour=not (no_color or os.environ.get('NO_COLOR')))
    return PlainScreen(sys.stdout)


def run_bench(args):
    raise_open_files_limit()
    server = data = None
    host, port = server_address(args, None)
    servers = [split_host_port(text.strip()) for text in args.servers.split(',')
               ] if args.servers else []
    if servers and (host is not None or args.data or args.server_pid):
        raise UserError('bench: --servers measures servers already running: no HOST, '
                        '--data or --server-pid with it')
    if any(port is None for _, port in servers):
        raise UserError('bench: --servers takes HOST:PORT,HOST:PORT,...')
    if args.senders >= args.clients:
        raise UserError('bench: --senders must be fewer than --clients')
    if args.data and host is not None:
        raise UserError('bench: --data is for the server the bench starts itself')
    if args.messages is None:
        args.messages = (int(args.rate * 5) if args.rate else
                         max(1, 10 ** 7 // (args.senders * (args.clients - 1))))
    try:  # from here on, a server the bench started is stopped whatever happens
        if host is None and not servers:
            data = tempfile.mkdtemp(prefix='chat-bench-') if args.data else None
            server, port = start_local_server(data)
            host, args.server_pid = '127.0.0.1', server.pid
        servers = servers or [(host, port)]
        addresses = [bench_address(host, port) for host, port in servers]
        print('chat.py bench: %s%s' % (', '.join(printable_address(server)
                                                 for server in servers),
                                       ' (started here)' if server else ''),
              flush=True)
        return Bench(addresses, args, server_pid=args.server_pid).run()
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        if data is not None:
            shutil.rmtree(data)


def main(argv=None):
    """Run the command line; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and not argv[0].startswith('-') and argv[0] not in COMMANDS:
        guess = difflib.get_close_matches(argv[0], COMMANDS, 1)
        parser.error("no command '%s'; did you mean: python3 chat.py %s" % (
            argv[0], ' '.join([guess[0]] + argv[1:]) if guess else 'client ' + ' '.join(argv)))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print('chat.py: error: %s' % exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Our output went to a pipe that closed (`| head`): that reader has
        # what it wanted.  Point stdout at nothing, or the flush at exit
        # would complain of the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a network or file error the code above did not name
        print('chat.py: error: %s' % (exc.strerror or exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how people leave: no traceback


if __name__ == '__main__':
    sys.exit(main())
