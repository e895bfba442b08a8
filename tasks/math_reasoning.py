"""math and math_rs: the text-only path. A task without images, trained by the same trainer.

Two recipes of the paper, one registered name each:
- `math`: Qwen2.5-Math-7B on SimpleRL-Zoo's MATH levels 3-5; reward 1 when the last \\boxed{}
  answer verifies against the gold answer, no format reward.
- `math_rs`: DeepSeek-R1-Distill-Qwen-1.5B on open-s1 (open-rs); reward = format
  + 2 x cosine length-scaled correctness.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from gpg_vl.datafiles import BadRowError, load_split
from gpg_vl.rewards import last_boxed, symbolic_equal
from gpg_vl.task import Prompt, Row, ScoreContext, Task, TaskConfig, register_task

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# SimpleRL-Zoo's `input` field: the question already inside Qwen's chat template.
SIMPLERL_INPUT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
                  + BOXED_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
OPEN_RS_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer, and put your final answer within \\boxed{} . The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. Note that respond by English, NOT use other languages.")
GOLD_FIELDS = ("gt_answer", "target", "ground_truth_answer", "answer", "solution", "reward_model")
THINK_END = "\n</think>\n"
COSINE_MAX_LEN = 1000  # characters, as the reference measured length


def _text(record: dict[str, Any], field: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(f"field {field!r} is empty or not text")
    return value


def _first(record: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """The first of `fields` the record has; a null is absent (parquet fills missing columns with nulls)."""
    return next((f for f in fields if record.get(f) is not None), None)


def gold_answer(record: dict[str, Any], fields: tuple[str, ...] = GOLD_FIELDS) -> str:
    """The first gold field present; a worked solution is reduced to its last \\boxed{} answer."""
    field = _first(record, fields)
    if field is None:
        raise BadRowError(f"no answer field; expected one of {', '.join(fields)}")
    if field == "reward_model":  # verl's layout: {"style": "rule", "ground_truth": "..."}
        if not isinstance(record[field], dict) or "ground_truth" not in record[field]:
            raise BadRowError("field 'reward_model' has no ground_truth")
        record, field = record[field], "ground_truth"
    text = _text(record, field)
    boxed = last_boxed(text)
    answer = text.strip() if boxed is None else boxed
    if not answer:
        raise BadRowError(f"field {field!r} holds an empty \\boxed{{}} answer")
    return answer


def _chat(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRowError("field 'prompt' must be text or a list of {role, content} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class _MathTask(Task):
    """Shared by both recipes: rows from local files or the hub, the symbolic check."""

    sample: str = ""
    metric_label = "pass@1"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.options_with_defaults({})  # no options: the time limit is task.reward_timeout_s
        self._rows: dict[str, list[Row]] = {}

    @staticmethod
    def convert(record: dict[str, Any], root: Path | None) -> Row:
        raise NotImplementedError

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            path = self.config.data_path or str(SAMPLES / self.sample)
            self._rows[split] = load_split(self, path, split, self.convert)
        return self._rows[split]

    def prompt(self, row: Row) -> Prompt:
        return row["prompt"]

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The content of the last \\boxed{}."""
        # Deviation: the last \boxed{} is the answer; the reference let math-verify pick one.
        return last_boxed(completion)

    def correct(self, completion: str, row: Row, ctx: ScoreContext) -> bool:
        answer = self.answer(completion, row, ctx)
        return answer is not None and symbolic_equal(answer, row["answer"], self.config.reward_timeout_s)


@register_task("math")
class MathTask(_MathTask):
    """MATH problems for a base model (the paper's Qwen2.5-Math-7B run on SimpleRL-Zoo data).

    Data: SimpleRL-Zoo's `simplelr_qwen_level3to5` folder (train.parquet, test.parquet from the
    hub set hkust-nlp/SimpleRL-Zoo-Data), or any file with the same fields. The prompt is the
    first present of: `input` (text already in the chat template, sent as is: SimpleRL-Zoo's
    layout), `prompt` (raw text, or a list of {role, content} chat messages as verl stores it),
    `question` or `problem` (put in one user message asking for a \\boxed{} answer). The gold
    answer is the first present of `gt_answer`, `target`, `ground_truth_answer`, `answer`,
    `solution`, `reward_model.ground_truth` (verl); a worked solution is reduced to its last
    \\boxed{} answer.

    Reward: "accuracy" is 1 when the completion's last \\boxed{...} verifies against the gold
    with math-verify under a time limit, else 0. No format reward.

    Options: none.
    """

    sample = "math"

    @staticmethod
    def convert(record: dict[str, Any], root: Path | None) -> Row:
        field = _first(record, ("input", "prompt", "question", "problem"))
        if field is None:
            raise BadRowError("no prompt field; expected one of input, prompt, question, problem")
        if field in ("question", "problem"):
            prompt: Prompt = [{"role": "user", "content": _text(record, field).strip() + "\n" + BOXED_INSTRUCTION}]
        elif isinstance(record[field], str) or field == "input":
            prompt = _text(record, field)
        else:
            prompt = _chat(record[field])
        return {"prompt": prompt, "answer": gold_answer(record)}

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        # Deviation: a gold answer math-verify cannot parse scores 0 (the reference gave 1).
        return {"accuracy": float(self.correct(completion, row, ctx))}

    @classmethod
    def make_samples(cls, folder: Path, per_split: int = 10, seed: int = 0) -> None:
        """Arithmetic and algebra problems in SimpleRL-Zoo's parquet layout."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            rows = []
            for _ in range(per_split):
                question, answer = _problem(rng)
                rows.append({"input": SIMPLERL_INPUT.replace("{question}", question), "question": question,
                             "gt_answer": answer, "target": answer, "subject": "Algebra", "level": 3})
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")


@register_task("math_rs")
class MathRSTask(_MathTask):
    """Competition math for an R1-distilled model (the paper's GPG-RS1 run, open-rs recipe).

    Data: open-s1 (hub `knoveleng/open-s1`, one train split) or any file with fields
    `problem` and `solution`; the gold answer is the solution's last \\boxed{} answer, or the
    whole solution when it has none. Prompt: open-rs's R1-style system prompt, then the problem.

    Reward components:
      format: 1 when "\\n</think>\\n" appears exactly once in the completion, else 0; weight 1.
      cosine: correctness shaped by length L in characters: cos(pi * min(L, 1000) / 1000) moves a
        correct answer from 1.0 (short) to 0.5 (1000+ characters) and a wrong one from -0.5
        (short) to 0.0; weight 2.
      accuracy: 1 when the last \\boxed{...} verifies against the gold (math-verify, time limit);
        weight 0: the headline metric, already inside "cosine".
    So the training reward is format + 2 x cosine, as open-rs weighted its two rewards.

    Options: none.
    """

    sample = "math_rs"
    reward_components = ("accuracy", "format", "cosine")
    reward_weights = {"accuracy": 0.0, "format": 1.0, "cosine": 2.0}

    @staticmethod
    def convert(record: dict[str, Any], root: Path | None) -> Row:
        prompt = [{"role": "system", "content": OPEN_RS_SYSTEM}, {"role": "user", "content": _text(record, "problem")}]
        return {"prompt": prompt, "answer": gold_answer(record, ("solution",))}

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        correct = self.correct(completion, row, ctx)
        return {"accuracy": float(correct), "format": float(completion.count(THINK_END) == 1),
                "cosine": cosine_scaled(correct, len(completion))}

    @classmethod
    def make_samples(cls, folder: Path, per_split: int = 10, seed: int = 1) -> None:
        """Arithmetic and algebra problems in open-s1's layout (JSON lines of problem, solution)."""
        import json

        rng = random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            lines = []
            for _ in range(per_split):
                problem, answer = _problem(rng)
                solution = f"Working it out step by step gives ${answer}$. The answer is $\\boxed{{{answer}}}$."
                lines.append(json.dumps({"problem": problem, "solution": solution}) + "\n")
            (folder / f"{split}.jsonl").write_text("".join(lines))


def cosine_scaled(correct: bool, length: int) -> float:
    """open-r1's cosine reward with the length clamped to COSINE_MAX_LEN characters: short
    correct answers earn most, short wrong ones lose most."""
    # Deviation: L is clamped; the reference's cosine rose again past 1000 (2000 chars scored as 0 chars).
    c = math.cos(math.pi * min(max(length, 0), COSINE_MAX_LEN) / COSINE_MAX_LEN)
    short, long = (1.0, 0.5) if correct else (-0.5, 0.0)
    return long + (short - long) * (1.0 + c) / 2.0


def _problem(rng: random.Random) -> tuple[str, str]:
    """A small problem and its answer in LaTeX: a sum, a linear equation or a fraction."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is ${b} + {c} \\times {a}$?", str(b + c * a)
    if kind == 1:
        return f"Solve for $x$: ${a}x + {b} = {a * c + b}$.", str(c)
    # c and ac + 1 share no factor, so c / (ac + 1) is already in lowest terms.
    return f"Simplify $\\frac{{{2 * c}}}{{{2 * (a * c + 1)}}}$.", f"\\frac{{{c}}}{{{a * c + 1}}}"
