"""Reward pieces that several tasks share: answer format, tag extraction, boxes, numbers, choices.

Pure functions of strings and numbers; they know nothing of tasks or models. Each one must
accept any string (empty, unicode, megabytes long) without raising or running for long, so
whitespace runs in the regular expressions are matched possessively ("*+"): two plain "*"
repeats of whitespace side by side would backtrack quadratically on a long run of spaces.
The one exception to "pure": `symbolic_equal` runs math-verify in a process that can be killed,
because a symbolic check can run for minutes on one adversarial answer: in a reward worker of
gpg_vl.scoring (which the pool kills when a completion overruns), or else in a worker process
of its own, killed at its time limit.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path
from typing import Callable, NoReturn, Sequence, Union

from gpg_vl.boxes import Box, Size

# ---------------------------------------------------------------- format and tags

THINK_ANSWER_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
"""The common format of the vision tasks (TASKS.md). `has_think_answer_format` decides the same
as `THINK_ANSWER_RE.fullmatch(text.strip())`, in linear time."""

_THINK_THEN_ANSWER = re.compile(r"</think>\s*+<answer>")
_OPEN, _CLOSE = "<think>", "</answer>"


def has_think_answer_format(text: str) -> bool:
    """True iff the whole stripped completion is `<think>...</think> <answer>...</answer>`."""
    # fullmatch of THINK_ANSWER_RE backtracks quadratically on many "</think><answer>" pairs;
    # since ".*?" matches anything, it matches iff the text opens with <think>, closes with
    # </answer>, and a "</think>\s*<answer>" lies strictly between the two.
    s = text.strip()
    if not (s.startswith(_OPEN) and s.endswith(_CLOSE)):
        return False
    return _THINK_THEN_ANSWER.search(s, len(_OPEN), len(s) - len(_CLOSE)) is not None


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last complete `<tag>...</tag>`; None when there is none."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    # The last opening tag before the last closing one: "<a>x<a>y</a>" gives "y".
    start = text.rfind(f"<{tag}>", 0, close)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : close].strip()


# ---------------------------------------------------------------- boxes

_NUM = r"(?<![\d.])(-?(?:\d++(?:\.\d*+)?|\.\d++))"
# Between two coordinates: a comma or semicolon, plain whitespace, or ")(" / "), (" / "], [".
_SEP = r"(?:\s*+[)\]]\s*+,?\s*+[(\[]\s*+|\s*+[,;]\s*+|\s++)"
_BOX_RE = re.compile(_SEP.join([_NUM] * 4))


def parse_box(text: str) -> Box | None:
    """The first four numbers in a row that form a box: "(x1,y1),(x2,y2)", "[x1, y1, x2, y2]",
    "x1,y1,x2,y2" or "x1 y1 x2 y2"; None when none parse or a value is not finite.
    The box is returned as written, not reordered: an inverted box (x2 < x1 or y2 < y1) is a
    wrong answer, and `box_iou` / `box_giou` score it as empty rather than silently fixing it."""
    m = _BOX_RE.search(text)
    if m is None:
        return None
    box = tuple(float(v) for v in m.groups())
    return box if all(math.isfinite(v) for v in box) else None


def clip_box(box: Box, image_size: Size) -> Box:
    """The box with every coordinate clamped to the image [0, w] x [0, h]."""
    w, h = image_size
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def _valid(box: Box) -> bool:
    return all(math.isfinite(v) for v in box) and box[2] >= box[0] and box[3] >= box[1]


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _iou_parts(a: Box, b: Box) -> tuple[float, float]:
    """(intersection, union) of two valid boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter, _area(a) + _area(b) - inter


def box_iou(a: Box, b: Box, image_size: Size | None = None) -> float:
    """Intersection over union in [0, 1]. Inverted, non-finite or zero-area boxes give 0.
    With `image_size`, both boxes are first clipped to the image, so the part of a predicted
    box outside the picture (which no ground truth can cover) is not counted in the union."""
    if image_size is not None and _valid(a) and _valid(b):
        a, b = clip_box(a, image_size), clip_box(b, image_size)
    if not (_valid(a) and _valid(b)):
        return 0.0
    inter, union = _iou_parts(a, b)
    return inter / union if union > 0 else 0.0


def box_giou(a: Box, b: Box, image_size: Size | None = None) -> float:
    """Generalised IoU (Rezatofighi et al. 2019) in [-1, 1]: IoU minus the share of the
    smallest enclosing box that neither box covers. An inverted or non-finite box gives -1
    (not a box at all: the worst score); a zero-area box keeps the enclosing-box term, so a
    point inside the target (0) still beats a point far from it (towards -1)."""
    if image_size is not None and _valid(a) and _valid(b):
        a, b = clip_box(a, image_size), clip_box(b, image_size)
    if not (_valid(a) and _valid(b)):
        return -1.0
    inter, union = _iou_parts(a, b)
    iou = inter / union if union > 0 else 0.0
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if hull <= 0:  # both boxes are the same point or lie on one line: nothing to enclose
        return iou
    return iou - (hull - union) / hull


# ---------------------------------------------------------------- numbers

_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_DEGREE = re.compile(r"\^\s*+\{?\s*+\\circ\s*+\}?|\\circ|\\degree")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*+\{\s*+(\d+(?:\.\d+)?)\s*+\}\s*+\{\s*+(\d+(?:\.\d+)?)\s*+\}")
_UNSIGNED = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)"
# A trailing unit: degree or percent sign, then words of letters ("cm", "square units", "cm^2").
_UNIT = r"\s*+[°%]?\s*+(?:[^\W\d_]++(?:\s++[^\W\d_]++)*+(?:\^?[23])?)?\s*+\.?"
_NUMBER_RE = re.compile(r"(-?)\s*" + _UNSIGNED + r"(?:\s*/\s*" + _UNSIGNED + r")?" + _UNIT)


def normalize_number(text: str) -> float | None:
    """The number a short answer states: "140", "140°", "140 degrees", "3.5cm", "1,000", "-2",
    "1/2", "\\frac{1}{2}", "$140^\\circ$"; None when the text is anything else ("2 or 3", "1,5").
    "50%" is 50, not 0.5: the sign is read as a unit, so "50%" and "50" match either way round."""
    s = unicodedata.normalize("NFKC", text).replace("\u2212", "-").replace("\u2013", "-")
    s = s.replace("$", "").replace("\\%", "%")
    for space in ("\\,", "\\!", "\\;", "\\ "):
        s = s.replace(space, " ")
    s = _LATEX_TEXT.sub(r" \1", s)
    s = _LATEX_DEGREE.sub("°", s)
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    m = _NUMBER_RE.fullmatch(s.strip())
    if m is None:
        return None
    sign, num, den = m.groups()
    value = float(num.replace(",", ""))
    if den is not None:
        d = float(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    value = -value if sign else value
    return value if math.isfinite(value) else None


def numbers_match(a: Union[str, float], b: Union[str, float], rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """True iff both sides are numbers (strings go through `normalize_number`) and close."""
    x = normalize_number(a) if isinstance(a, str) else float(a)
    y = normalize_number(b) if isinstance(b, str) else float(b)
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


# ---------------------------------------------------------------- choices


def _choice_key(text: str) -> str:
    return "".join(ch for ch in text.casefold() if not ch.isspace() and ch != "_")


def exact_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The one choice the whole answer names (ignoring case, whitespace and underscores), else None.
    Closes two known exploits of substring matching (Visual-RFT issues 79, 176): an empty answer
    names nothing, and "A or B or C" equals no single choice. Choices that collide after
    normalisation are ambiguous and also give None; a task should reject such a class list."""
    key = _choice_key(answer)
    if not key:
        return None
    hits = [c for c in choices if _choice_key(c) == key]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- math answers

_BOXED = ("\\boxed", "\\fbox")
_BOXED_WORD = re.compile(r" ++([^\s$]++)")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == "{", or None when unclosed.
    A backslash escapes the next character, so "\\{" and "\\}" are not counted as braces."""
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(text, start):  # jumps over plain text in C, not per character
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : m.start()]
    return None


def last_boxed(text: str) -> str | None:
    """Stripped content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included:
    "\\boxed{\\frac{1}{2}}" gives "\\frac{1}{2}". "\\boxed 5" gives "5". None when there is no
    box, or the last one is never closed (a truncated completion is not scored by an earlier box)."""
    at, name = max((text.rfind(n), n) for n in _BOXED)
    if at < 0:
        return None
    rest = at + len(name)
    if text.startswith("{", rest):
        inner = _braced(text, rest)
        return None if inner is None else inner.strip()
    m = _BOXED_WORD.match(text, rest)  # "\boxed 5": the word after the space
    return m.group(1) if m else None


REWARD_TIMEOUT_S = 1.0
"""Default seconds one completion's reward may take (task.reward_timeout_s): symbolic checks
that take longer are on adversarial answers, not on the short final answers of real ones."""
SYMBOLIC_MAX_CHARS = 1000
"""Longer answers are scored wrong without parsing: a final answer is short, and sympy's time
grows fast with the length of what it parses."""
_WORKER_MEMORY = 2 << 30  # bytes of address space a checking process may add to what it holds at start
_WORKER_START_S = 120.0  # importing sympy on a busy machine; not part of any answer's time limit


def subprocess_env() -> dict[str, str]:
    """The environment of a worker interpreter: gpg_vl importable, one BLAS/OpenMP thread (the
    trainer's cores are not the workers' to share out)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1"}


def limit_memory(extra_bytes: int) -> None:
    """Let this process's address space grow by at most `extra_bytes`: a runaway allocation
    (sympy expanding 9^{9^{9^9}}) then fails here with MemoryError instead of taking the machine."""
    import resource

    try:
        with open("/proc/self/statm") as f:  # Linux; elsewhere the time limit alone holds
            now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (now + extra_bytes, now + extra_bytes))
    except (OSError, ValueError):
        pass


@functools.cache
def _math_verify():
    import logging

    from math_verify import parse, verify

    # The process is killed on overrun; math-verify's own SIGALRM timeouts are off and their
    # "timeout is disabled" warnings with them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse, verify


@functools.lru_cache(maxsize=4096)  # the same gold answer is parsed once per group, not G times
def _parsed(answer: str):
    parse, _ = _math_verify()
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def _verify_here(pred: str, gold: str) -> bool:
    """math-verify's verdict, computed in this process, with no time limit of its own."""
    try:
        gold_parsed, pred_parsed = _parsed(gold), _parsed(pred)
        return bool(gold_parsed) and bool(pred_parsed) and _math_verify()[1](gold_parsed, pred_parsed,
                                                                               timeout_seconds=None)
    except Exception:  # MemoryError and RecursionError included: a failed check is a wrong answer
        return False


def _serve_symbolic() -> None:
    """Worker loop: one JSON request {"pred", "gold"} per input line, one "1"/"0" per output line."""
    limit_memory(_WORKER_MEMORY)
    if not warm_symbolic():  # before "ready": no answer's time limit goes on the first check's set-up
        sys.exit("math-verify is not installed")
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a stray print from sympy must not be read as a reply
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            ok = _verify_here(req["pred"], req["gold"])
        except (ValueError, KeyError, TypeError):
            ok = False
        replies.write("1\n" if ok else "0\n")
        replies.flush()


class _SymbolicWorker:
    """One math-verify process per trainer process, killed and restarted when a check overruns.

    Why a process: sympy can spin for minutes or allocate gigabytes on one answer (9^{9^{9^9}}),
    inside C code that neither SIGALRM nor a thread can interrupt (math-verify's own timeouts use
    SIGALRM, which also works only on the main thread). Killing a process always works.
    The pipes are read with poll(): POSIX only, like the trainer."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.lock = threading.Lock()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from gpg_vl.rewards import _serve_symbolic; _serve_symbolic()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=subprocess_env())
        self.ready = False

    def _start(self) -> None:
        """A worker that has said "ready" (spawned now, or earlier and importing meanwhile)."""
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()
        if not self.ready:
            if self._reply(_WORKER_START_S) != "ready":
                self.stop()
                raise RuntimeError("the math-verify worker did not start (is math-verify installed?)")
            self.ready = True

    def _reply(self, timeout_s: float) -> str | None:
        """One line from the worker, or None on timeout or when it died."""
        fd, data = self.proc.stdout.fileno(), b""
        waiter = select.poll()  # not select(), which fails on descriptors past 1024 in a busy trainer
        waiter.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not waiter.poll(left * 1000):
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return None
            data += chunk
        return data.decode().strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self.lock:
            self._start()
            try:
                self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
                self.proc.stdin.flush()
            except BrokenPipeError:
                self.stop()
                return False
            reply = self._reply(timeout_s)
            if reply is None:  # overran or died: the answer is wrong; a fresh worker imports meanwhile
                self.stop()
                self._spawn()
            return reply == "1"


_SYMBOLIC = _SymbolicWorker()
atexit.register(_SYMBOLIC.stop)
_request_warm: Callable[[], NoReturn] | None = None  # set in a reward worker
_warm = False  # math-verify imported and run once in this process (or in the one it was forked from)


def check_symbolic_here(request_warm: Callable[[], NoReturn]) -> None:
    """From now on run symbolic checks in this process: a reward worker of gpg_vl.scoring, which
    the pool kills when a completion overruns its limit. `request_warm()` is called, and does
    not return, when math-verify is not warm here yet: the pool then runs `warm_symbolic` once,
    in the process its workers are forked from, and scores the completion again in a fresh
    fork, so that no completion's time limit goes on importing sympy or building its parsers."""
    global _request_warm
    _request_warm = request_warm


def warm_symbolic() -> bool:
    """Import math-verify and run one check (the first builds its parsers), so that this process
    and its forks check at full speed from the first answer; False when math-verify is missing."""
    global _warm
    try:
        _math_verify()
    except ImportError:
        return False
    _verify_here("1/2", "0.5")
    _warm = True
    return True


def symbolic_equal(pred: str, gold: str, timeout_s: float = REWARD_TIMEOUT_S) -> bool:
    """True iff math-verify finds `pred` equal to `gold` (both LaTeX answers without the box,
    e.g. "\\frac{\\sqrt2}{2}" and "\\sqrt{2}/2") within `timeout_s` seconds (in a reward worker:
    within the pool's limit for the whole completion). A check that runs longer, fails, or gets
    an empty or over-long answer is False; this function never hangs and never raises, except
    when the worker cannot start at all (math-verify missing)."""
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold or len(pred) > SYMBOLIC_MAX_CHARS or len(gold) > SYMBOLIC_MAX_CHARS:
        return False
    if _request_warm is not None:
        if not _warm:
            _request_warm()
        return _verify_here(pred, gold)
    return _SYMBOLIC.check(pred, gold, timeout_s)
