"""The bundled samples are what gpg_vl.samples writes, byte for byte, and small."""

import subprocess
import sys

import pytest

from gpg_vl.resources import SAMPLES
from gpg_vl.samples import WRITERS, write_samples


def files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_bundled_sample_is_what_the_writer_writes(tmp_path, name):
    (made,) = write_samples(tmp_path, [name])
    bundled = SAMPLES / name
    assert files(made) == files(bundled)
    different = [str(p) for p in files(made) if (made / p).read_bytes() != (bundled / p).read_bytes()]
    assert not different


def test_every_bundled_sample_has_a_writer_and_all_are_small():
    assert sorted(p.name for p in SAMPLES.iterdir() if p.is_dir()) == sorted(WRITERS)
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 2_000_000


def test_the_command_names_an_unknown_sample(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpg_vl.samples", "--out", str(tmp_path), "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no sample nope" in done.stderr
