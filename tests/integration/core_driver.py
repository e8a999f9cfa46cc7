"""Build a registration test driver: one tests/unit/test_register*.c with the
compute core's registration sources, for the oracle tests that run the C
code on pairs made in numpy (test_register*_oracle.py)."""

import glob
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What src/core/register_*.c use besides each other.
DEPS = ["src/core/fft_fftw.c", "src/core/select.c", "src/core/transform.c", "src/util/err.c",
        "src/util/log.c", "src/util/pixel.c"]


def build(out_dir, unit_test):
    """Compile tests/unit/<unit_test>.c into out_dir/<unit_test>; its path."""
    exe = os.path.join(str(out_dir), unit_test)
    srcs = (["tests/unit/%s.c" % unit_test]
            + sorted(os.path.relpath(p, ROOT)
                     for p in glob.glob(os.path.join(ROOT, "src/core/register_*.c")))
            + DEPS)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fftw3f"],
                           capture_output=True, text=True, check=True).stdout.split()
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror",
           "-Iinclude", "-pthread"] + srcs + flags + ["-lfftw3f_threads", "-lm", "-o", exe]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return exe
