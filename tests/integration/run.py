#!/usr/bin/env python3
"""Integration test runner: discovers tests/integration/test_*.py (unittest).

    tests/integration/run.py [-v] [-k PATTERN ...] [MODULE_OR_TEST ...]

Prints one `ok` / `FAIL` / `ERROR` / `skip` line per test (failure tracebacks
and the test's diagnostics follow), then exactly one final line
`N passed, N failed` (`, N skipped` when some were skipped).  Exit status 0 only
if nothing failed and at least one test ran.
"""

import argparse
import os
import signal
import sys
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


class Result(unittest.TestResult):
    def __init__(self, stream, verbose):
        super().__init__()
        self.stream = stream
        self.verbose = verbose
        self.passed = 0
        self.nfailed = 0
        self.nskipped = 0
        self._t0 = {}
        self._bad = set()

    def _say(self, text):
        self.stream.write(text + '\n')
        self.stream.flush()

    def startTest(self, test):
        super().startTest(test)
        self._t0[test.id()] = time.monotonic()
        if self.verbose:
            self._say('... %s' % test.id())

    def _elapsed(self, test):
        return time.monotonic() - self._t0.get(test.id(), time.monotonic())

    def _diag(self, test):
        fn = getattr(test, 'diagnostics', None)
        if not fn:
            return ''
        try:
            return fn() or ''
        except Exception:  # noqa: BLE001 - diagnostics must never hide the failure
            return 'diagnostics failed:\n' + traceback.format_exc()

    def _bad_one(self, test, kind, err):
        first = test.id() not in self._bad
        self._bad.add(test.id())
        if first:
            self.nfailed += 1
        self._say('%s %s (%.1fs)' % (kind, test.id(), self._elapsed(test)))
        text = self._exc_info_to_string(err, test)
        self._say('    ' + text.rstrip().replace('\n', '\n    '))
        diag = self._diag(test)
        if diag:
            self._say('    --- diagnostics ---')
            self._say('    ' + diag.rstrip().replace('\n', '\n    '))

    def addError(self, test, err):
        super().addError(test, err)
        self._bad_one(test, 'ERROR', err)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._bad_one(test, 'FAIL', err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = 'FAIL' if issubclass(err[0], test.failureException) else 'ERROR'
            self._bad_one(test, kind, err)

    def addSuccess(self, test):
        super().addSuccess(test)
        if test.id() not in self._bad:
            self.passed += 1
            self._say('ok %s (%.1fs)' % (test.id(), self._elapsed(test)))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.nskipped += 1
        self._say('skip %s: %s' % (test.id(), reason))

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.passed += 1
        self._say('ok %s (expected failure)' % test.id())

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.nfailed += 1
        self._say('FAIL %s (unexpected success)' % test.id())


def _matches(test, patterns):
    if not patterns:
        return True
    tid = test.id()
    return any(p in tid for p in patterns)


def _flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('-v', '--verbose', action='store_true')
    ap.add_argument('-k', dest='patterns', action='append', default=[],
                    help='only tests whose id contains PATTERN (repeatable)')
    ap.add_argument('names', nargs='*', help='test modules or test ids (test_core.Core.test_a...)')
    args = ap.parse_args()

    sys.path.insert(0, HERE)
    import imapfixture

    def on_term(signum, frame):
        # SIGTERM (e.g. from timeout(1)) skips atexit: stop every fixture process first.
        sys.stdout.write('\nrun.py: killed by signal %d; stopping fixtures\n' % signum)
        sys.stdout.flush()
        imapfixture._kill_everything()
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    loader = unittest.TestLoader()
    try:
        if args.names:
            suite = loader.loadTestsFromNames(
                [n[:-3] if n.endswith('.py') else n for n in
                 (os.path.basename(x) if x.endswith('.py') else x for x in args.names)])
        else:
            suite = loader.discover(HERE, pattern='test_*.py', top_level_dir=HERE)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print('0 passed, 1 failed')
        return 1

    tests = [t for t in _flatten(suite) if _matches(t, args.patterns)]
    result = Result(sys.stdout, args.verbose)
    t0 = time.monotonic()
    unittest.TestSuite(tests).run(result)
    # Import errors from discovery show up as _FailedTest: counted by addError above.
    sys.stdout.write('# integration: %d tests in %.1fs\n' % (result.testsRun, time.monotonic() - t0))
    final = '%d passed, %d failed' % (result.passed, result.nfailed)
    if result.nskipped:
        final += ', %d skipped' % result.nskipped
    sys.stdout.write(final + '\n')
    sys.stdout.flush()
    if result.nfailed or result.testsRun == 0:
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
