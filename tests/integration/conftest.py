"""Fixtures for the scopefs end-to-end tests: real mounts of build/scopefs.

Each test gets its own RAW_DIR, mountpoint and cache folder under tmp_path.
The daemon runs with -f in a subprocess (so a crash is visible and kill -9 is
possible), its stderr goes to a log file that is printed when the test fails,
and every mount is undone in teardown (fusermount3 -u, then kill -9 and a
lazy unmount if the daemon does not go away).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO = Path(__file__).resolve().parents[2]
SCOPEFS = Path(os.environ.get('SCOPEFS_BIN', REPO / 'build' / 'scopefs'))
MOUNT_TIMEOUT_S = 20


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a few seconds')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, 'rep_' + rep.when, rep)


def is_mounted(path):
    """Whether path is a mountpoint listed in /proc/mounts."""
    real = os.path.realpath(path)
    with open('/proc/mounts') as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace('\\040', ' ') == real:
                return True
    return False


def format_opts(opts):
    """{'cache': '/x', 'ro': None} -> 'cache=/x,ro'."""
    parts = []
    for k, v in opts.items():
        parts.append(k if v is None else '%s=%s' % (k, v))
    return ','.join(parts)


class Mount:
    """One running scopefs daemon (foreground, in a subprocess)."""

    def __init__(self, raw, mnt, cache, log, opts, extra_args):
        self.raw, self.mnt, self.cache, self.log = Path(raw), Path(mnt), Path(cache), Path(log)
        self.opts = dict(opts)
        self.extra_args = list(extra_args)
        self.proc = None
        self.logf = None

    def command(self):
        opts = dict(self.opts)
        if 'cache' not in opts and self.cache is not None:
            opts['cache'] = str(self.cache)
        args = [str(SCOPEFS), '-f'] + self.extra_args
        if opts:
            args += ['-o', format_opts(opts)]
        return args + [str(self.raw), str(self.mnt)]

    def start(self):
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log, 'ab')
        self.logf.write(('$ %s\n' % ' '.join(self.command())).encode())
        self.logf.flush()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        status = self.mnt / '.scopefs' / 'status'
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError('scopefs exited with %d before mounting:\n%s'
                                     % (self.proc.returncode, self.log_text()))
            if status.exists():
                return self
            time.sleep(0.05)
        raise AssertionError('scopefs did not mount within %d s:\n%s'
                             % (MOUNT_TIMEOUT_S, self.log_text()))

    @property
    def pid(self):
        return self.proc.pid

    def path(self, *parts):
        return self.mnt.joinpath(*parts)

    def status(self):
        with open(self.mnt / '.scopefs' / 'status', 'rb') as f:
            return json.loads(f.read())

    def log_text(self):
        if self.logf:
            self.logf.flush()
        try:
            return self.log.read_text(errors='replace')
        except OSError:
            return ''

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def unmount(self):
        """Unmount and wait for the daemon; kill -9 and lazy-unmount if it hangs."""
        if self.proc is None:
            return
        if is_mounted(self.mnt):
            subprocess.run(['fusermount3', '-u', str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill9()
        if is_mounted(self.mnt):
            subprocess.run(['fusermount3', '-u', '-z', str(self.mnt)], capture_output=True)
        if self.logf:
            self.logf.close()
            self.logf = None
        self.returncode = self.proc.returncode
        self.proc = None


class Scopefs:
    """Factory for mounts within one test; remembers them for teardown."""

    def __init__(self, tmp_path):
        self.tmp = Path(tmp_path)
        self.raw = self.tmp / 'raw'
        self.raw.mkdir()
        self.mounts = []
        self.n = 0

    def mount(self, raw=None, cache=None, opts=None, args=(), mnt=None):
        """Mount raw (default this test's RAW_DIR) with its own mountpoint and
        (unless given) cache folder; returns a started Mount."""
        if not SCOPEFS.exists():
            pytest.fail('%s is not built (run make)' % SCOPEFS)
        self.n += 1
        mnt = Path(mnt) if mnt else self.tmp / ('mnt%d' % self.n)
        cache = Path(cache) if cache else self.tmp / ('cache%d' % self.n)
        m = Mount(raw or self.raw, mnt, cache, self.tmp / ('scopefs%d.log' % self.n),
                  opts or {}, args)
        self.mounts.append(m)
        return m.start()

    def run(self, argv, timeout=15):
        """Run scopefs with -f and argv (options then dirs) expecting it to
        exit (a rejected command line).  Returns the CompletedProcess; kills
        and unmounts if it mounted instead."""
        if not SCOPEFS.exists():
            pytest.fail('%s is not built (run make)' % SCOPEFS)
        try:
            return subprocess.run([str(SCOPEFS), '-f'] + list(argv), capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            for a in argv[-1:]:
                subprocess.run(['fusermount3', '-u', '-z', a], capture_output=True)
            raise AssertionError('scopefs %s did not exit (it mounted?)' % ' '.join(argv))

    def teardown(self, failed):
        for m in self.mounts:
            try:
                m.unmount()
            finally:
                if failed:
                    sys.stderr.write('\n----- %s -----\n%s\n' % (m.log, m.log_text()))


@pytest.fixture
def scopefs(tmp_path, request):
    s = Scopefs(tmp_path)
    yield s
    rep = getattr(request.node, 'rep_call', None)
    failed = rep is not None and rep.failed
    s.teardown(failed)
    # Sources and caches can be large (mem test): drop them now, not at the
    # end of the session; keep them (and always the logs) when the test failed.
    if not failed:
        for p in [s.raw] + list(tmp_path.glob('cache*')):
            if p.exists() and not any(is_mounted(m.mnt) for m in s.mounts):
                subprocess.run(['chmod', '-R', 'u+rwX', str(p)], capture_output=True)
                shutil.rmtree(p, ignore_errors=True)


def read_all(path, bs=1 << 20):
    """The whole file, read sequentially in bs chunks."""
    out = bytearray()
    with open(path, 'rb') as f:
        while True:
            b = f.read(bs)
            if not b:
                return bytes(out)
            out += b


def tree(root):
    """{relative path: (kind, size)} of everything under root (no following links)."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            kind = 'dir' if os.path.isdir(p) and not os.path.islink(p) else (
                'link' if os.path.islink(p) else 'file')
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == 'file' else 0)
    return out


@pytest.fixture(scope='session')
def slide_driver(tmp_path_factory):
    """tests/unit/test_slide.c built with src/io/slide.c into a private folder:
    its --info and --dump drive the slide reader alone, without a mount."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path_factory.mktemp('driver') / 'test_slide'
    pkgs = ['libtiff-4', 'libxxhash']
    cflags = subprocess.run(['pkg-config', '--cflags'] + pkgs, check=True, capture_output=True,
                            text=True).stdout.split()
    libs = subprocess.run(['pkg-config', '--libs'] + pkgs, check=True, capture_output=True,
                          text=True).stdout.split()
    srcs = ['tests/unit/test_slide.c', 'src/io/slide.c'] + sorted(
        str(p.relative_to(repo)) for p in (repo / 'src/util').glob('*.c'))
    cmd = [os.environ.get('CC', 'cc'), '-std=c11', '-D_GNU_SOURCE', '-O2', '-Wall', '-Wextra',
           '-Werror', '-Iinclude', '-pthread'] + cflags + srcs + libs + ['-lm', '-o', str(out)]
    subprocess.run(cmd, cwd=repo, check=True)
    return out
