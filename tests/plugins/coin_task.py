"""A test task whose groups are valid or not by construction, to exercise resampling.

Rows marked "fixed" score 1 whatever the completion (an all-equal, invalid group); the
others score the parity of the completion's length, so their groups are almost always
valid. The share of fixed rows sets how often a round falls below beta_th.
"""

from dataclasses import dataclass

from gpg_vl.task import Task, register_task


@dataclass
class CoinOptions:
    fixed_share: float = 0.7
    """Share of the rows whose groups are all-equal."""


@register_task("coin")
class CoinTask(Task):
    Options = CoinOptions
    reward_components = ("accuracy",)

    def rows(self, split):
        share = self.options.fixed_share
        n = 64
        return [{"id": i, "fixed": (i * 7919 % 100) < share * 100} for i in range(n)]

    def prompt(self, row):
        return f"coin {row['id']}:"

    def score(self, completion, row, ctx):
        return {"accuracy": 1.0 if row["fixed"] else float(len(completion) % 2)}
