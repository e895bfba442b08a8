"""A complete task plugin outside the package, as a user would write one.

    gpg-vl train --preset shapes task.name=assets/examples/brightness_task.py

The model sees a grey image and answers whether it is bright or dark. Rows are made from a
seed here; a task that reads files subclasses gpg_vl.task.FileTask and writes `convert`.
"""

import random
from dataclasses import dataclass

from PIL import Image

from gpg_vl.task import Task, register_task


@dataclass
class BrightnessOptions:
    num_rows: int = 256
    """Rows per split."""


@register_task("brightness")
class BrightnessTask(Task):
    """Is a grey image bright or dark? The answer is yes or no."""

    Options = BrightnessOptions  # task.options are checked against it: types, defaults, "did you mean"
    reward_components = ("accuracy", "format")
    reward_weights = {"accuracy": 1.0, "format": 0.5}

    def rows(self, split):
        rng = random.Random(f"brightness/{split}")
        levels = [rng.choice([rng.randint(0, 90), rng.randint(165, 255)]) for _ in range(self.options.num_rows)]
        return [{"level": v, "answer": "yes" if v > 127 else "no"} for v in levels]

    def prompt(self, row):
        question = "Is the image bright? Answer yes or no."
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def images(self, row):
        return [Image.new("RGB", (56, 56), (row["level"],) * 3)]

    def score(self, completion, row, ctx):
        said = completion.strip().lower()
        return {"accuracy": float(said == row["answer"]), "format": float(said in ("yes", "no"))}
