"""A test task with two images per row: which of them is brighter? The answer is 1 or 2, the
position of the image in the prompt, so a model (or a pipeline) that mixes up the order of a
row's images scores as wrong. The two images have different sizes (each resized on its own)."""

from PIL import Image

from gpg_vl.task import Task, register_task

SIZES = ((90, 60), (40, 120))


@register_task("pair")
class PairTask(Task):
    reward_components = ("accuracy",)

    def rows(self, split):
        # Two different grey levels per row (never a tie), the brighter one first or second.
        return [{"id": i, "levels": (40 + 50 * (i % 4), 40 + 50 * ((i + 1 + (i // 4) % 3) % 4))} for i in range(16)]

    def prompt(self, row):
        return [{"role": "user", "content": [{"type": "text", "text": "Image 1:"}, {"type": "image"},
                                             {"type": "text", "text": "Image 2:"}, {"type": "image"},
                                             {"type": "text", "text": "Which is brighter? Answer with one digit."}]}]

    def images(self, row):
        return [Image.new("RGB", size, (level,) * 3) for size, level in zip(SIZES, row["levels"])]

    def answer(self, completion, row, ctx):
        text = completion.strip()
        return int(text) if text in ("1", "2") else None

    def score(self, completion, row, ctx):
        first, second = row["levels"]
        return {"accuracy": float(self.answer(completion, row, ctx) == (1 if first > second else 2))}
