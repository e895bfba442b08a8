"""A test task whose reward misbehaves on demand, named by the completion: "slow" sleeps a
minute, "spin" loops in Python for a minute, "raise" raises, "crash" kills its own process
(as a crash in C code would), "nan" returns NaN; any other completion scores its length."""

import math
import os
import signal
import time

from gpg_vl.task import Task, register_task


@register_task("unruly")
class UnrulyTask(Task):
    reward_components = ("accuracy",)

    def rows(self, split):
        return [{"id": i} for i in range(8)]

    def prompt(self, row):
        return f"row {row['id']}:"

    def score(self, completion, row, ctx):
        if completion == "slow":
            time.sleep(60)
        elif completion == "spin":
            end = time.monotonic() + 60
            while time.monotonic() < end:
                pass
        elif completion == "raise":
            raise RuntimeError("a reward bug")
        elif completion == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif completion == "nan":
            return {"accuracy": math.nan}
        return {"accuracy": float(len(completion) + row["id"])}
