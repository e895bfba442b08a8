"""A test task whose valid groups all fall on rank 0, by construction.

Each row is a small grey image and a question. On the process of rank 1 (torchrun's RANK)
every completion scores 1 (an all-equal, invalid group); on rank 0 a completion scores the
parity of its length, so rank 0's groups are almost always valid. A trainer that rebuilds each
rank's batch locally makes rank 1 train filler at every step while rank 0 drops valid groups;
balancing moves whole groups, images included, from rank 0 to rank 1.
"""

import os

from PIL import Image

from gpg_vl.task import Task, image_chat, register_task


@register_task("skew")
class SkewTask(Task):
    reward_components = ("accuracy",)

    def rows(self, split):
        return [{"id": i, "level": (37 * i) % 256} for i in range(64)]

    def prompt(self, row):
        return image_chat(f"Image {row['id']}: is it bright?")

    def images(self, row):
        return [Image.new("RGB", (56, 56), (row["level"],) * 3)]

    def score(self, completion, row, ctx):
        if os.environ.get("RANK", "0") == "1":
            return {"accuracy": 1.0}
        return {"accuracy": float(len(completion) % 2)}
