"""A complete task plugin outside the package, as a user would write one.

    gpg-vl train --preset shapes task.name=assets/examples/brightness_task.py

The model sees a grey image and answers whether it is bright or dark. Rows are made from a
seed here; a real task would read them with gpg_vl.datafiles.load_rows.
"""

import random

from PIL import Image

from gpg_vl.task import Task, register_task


@register_task("brightness")
class BrightnessTask(Task):
    """Options: num_rows (int, default 256): rows per split."""

    reward_components = ("accuracy", "format")
    reward_weights = {"accuracy": 1.0, "format": 0.5}

    def rows(self, split):
        unknown = set(self.config.options) - {"num_rows"}
        if unknown:
            raise ValueError(f"brightness: unknown options {sorted(unknown)}; the only option is num_rows")
        rng = random.Random(f"brightness/{split}")
        levels = [rng.choice([rng.randint(0, 90), rng.randint(165, 255)])
                  for _ in range(int(self.config.options.get("num_rows", 256)))]
        return [{"level": v, "answer": "yes" if v > 127 else "no"} for v in levels]

    def prompt(self, row):
        question = "Is the image bright? Answer yes or no."
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def images(self, row):
        return [Image.new("RGB", (56, 56), (row["level"],) * 3)]

    def score(self, completion, row, ctx):
        said = completion.strip().lower()
        return {"accuracy": float(said == row["answer"]), "format": float(said in ("yes", "no"))}
