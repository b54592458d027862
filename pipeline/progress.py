"""Progress bars that suit where the output goes.

On a terminal: tqdm as usual. Elsewhere (a log file, CI, `dvc repro` piped to a file) a bar's
carriage-return refreshes pile up into lines of thousands of characters, so there it draws nothing
and prints plain lines instead: one when the bar closes (one epoch, one pass, one store) and, for
long bars, one every `PLAIN_EVERY_S` seconds in between.
"""

import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 60.0


class _Nowhere:
    def write(self, text):
        pass

    def flush(self):
        pass


class progress(tqdm):  # noqa: N801  (used like tqdm)
    """`tqdm(...)` with the same arguments; plain lines on stderr when stderr is not a terminal."""

    def __init__(self, *args, **kwargs):
        self._plain = not kwargs.get("disable") and not _is_terminal(kwargs.get("file") or sys.stderr)
        if self._plain:
            kwargs.update(file=_Nowhere(), mininterval=0, miniters=1, leave=False)
        super().__init__(*args, **kwargs)
        self._last_line = time.monotonic()

    def update(self, n=1):
        shown = super().update(n)
        if self._plain and time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._line()
        return shown

    def __iter__(self):
        for item in super().__iter__():
            yield item
            if self._plain and time.monotonic() - self._last_line >= PLAIN_EVERY_S:
                self._line()

    def close(self):
        if self._plain and not self.disable:
            self._line()
            self._plain = False  # close() may run twice (explicitly, then from __del__)
        super().close()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        d = self.format_dict
        count = f"{d['n']}/{d['total']}" if d["total"] else f"{d['n']}"
        rate = d["n"] / d["elapsed"] if d["elapsed"] else 0.0
        postfix = f", {d['postfix']}" if d.get("postfix") else ""
        print(f"{d['prefix'] or 'progress'}: {count} {d['unit']} in {d['elapsed']:.1f} s ({rate:.1f} {d['unit']}/s)"
              f"{postfix}", file=sys.stderr, flush=True)


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())
