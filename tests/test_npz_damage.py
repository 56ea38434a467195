"""Damaged npz files: each load, run in a child process so that a crash or a hang is caught,
either returns exactly the original arrays or raises NpzError (with verify=False, damaged data
bytes may also come back as different values, but nothing else may happen)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from npz_util import array_dicts, npz_bytes

# A damage is [kind, position, value, verify]: "flip" xors byte `position` with `value`,
# "cut" truncates the file to `position` bytes, "zero" clears `value` bytes from `position`,
# "insert" inserts `value` bytes 0xA5 at `position` (shifting every offset after it), "multi"
# applies the list of flips in `position`.
Damage = list

_REQUEST_TIMEOUT_S = 120


def apply_damage(data: bytes, damage: Damage) -> bytes:
    kind, pos, value, _ = damage
    if kind == "cut":
        return data[:pos]
    if kind == "multi":
        for flip in pos:
            data = apply_damage(data, flip)
        return data
    out = bytearray(data)
    if kind == "flip":
        out[pos] ^= value
    elif kind == "zero":
        out[pos : pos + value] = bytes(len(out[pos : pos + value]))
    elif kind == "insert":
        out[pos:pos] = b"\xa5" * value
    else:
        raise ValueError(kind)
    return bytes(out)


# ---------------------------------------------------------------- the child


def _child_main() -> None:
    """Serve requests from stdin: one JSON line each, one JSON line out per damaged variant."""
    import torch  # noqa: F401  (imported before vitcore, as users do)
    from npz_util import assert_same_arrays

    from vitcore import NpzError, load_npz

    for line in sys.stdin:
        req = json.loads(line)
        with open(req["base"], "rb") as f:
            base = f.read()
        with np.load(req["base"], allow_pickle=False) as f:
            want = {k: f[k] for k in f.files}
        for i, damage in enumerate(req["variants"]):
            path = os.path.join(req["dir"], f"v{i}.npz")
            with open(path, "wb") as f:
                f.write(apply_damage(base, damage))
            try:
                got = load_npz(path, verify=damage[3])
                for t in got.values():  # touch every byte: mapped pages must be readable
                    t.numpy().tobytes()
                try:
                    assert_same_arrays(got, want)
                    outcome = "same"
                except AssertionError as e:
                    outcome = f"different: {e}"[:300]
                del got
            except NpzError as e:
                outcome = "npzerror: " + str(e)[-160:]
            except BaseException as e:  # noqa: B036  (reported, then judged by the parent)
                outcome = f"other: {type(e).__name__}: {e}"
            os.remove(path)
            print(json.dumps({"i": i, "outcome": outcome}), flush=True)
        print(json.dumps({"done": len(req["variants"])}), flush=True)


# ---------------------------------------------------------------- the parent


class LoaderChild:
    """A long-lived child process that loads damaged variants; restarted after a crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines = queue.Queue()
        proc, lines = self.proc, self.lines
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, base: str, workdir: str, variants: list[Damage]) -> list[str]:
        """Outcomes, one per variant; fails the test if the child crashes or hangs."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"base": base, "dir": workdir, "variants": variants}) + "\n")
        self.proc.stdin.flush()
        outcomes: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=_REQUEST_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                pytest.fail(f"child hung on damage {variants[len(outcomes)]} of {base}")
            if line is None:
                self.proc.wait()
                err = self.proc.stderr.read()[-2000:]
                code = self.proc.returncode
                self.proc = None
                pytest.fail(f"child died (exit {code}) on damage {variants[len(outcomes)]} of {base}:\n{err}")
            msg = json.loads(line)
            if "done" in msg:
                return outcomes
            outcomes.append(msg["outcome"])


@pytest.fixture(scope="module")
def child():
    c = LoaderChild()
    yield c
    c.stop()


def check(outcomes: list[str], variants: list[Damage]) -> None:
    bad = []
    for outcome, damage in zip(outcomes, variants):
        allowed = outcome == "same" or outcome.startswith("npzerror: ")
        if not damage[3]:  # without the CRC, damaged data bytes are legitimately different values
            allowed = allowed or outcome.startswith("different: ")
        if not allowed:
            bad.append((damage, outcome))
    assert not bad, f"{len(bad)} bad outcomes, first ones: {bad[:5]}"


def _small_arrays() -> dict[str, np.ndarray]:
    return {
        "a": np.arange(5, dtype="<f4"),
        "b/c": np.array([True, False, True]),
        "d": np.array(-7, dtype=">i8"),
        "e": np.asfortranarray(np.arange(6, dtype="<i2").reshape(2, 3)),
    }


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_every_byte_flipped_and_every_truncation(child, tmp_path, compressed):
    data = npz_bytes(_small_arrays(), compressed)
    base = str(tmp_path / "base.npz")
    with open(base, "wb") as f:
        f.write(data)
    variants: list[Damage] = []
    for pos in range(len(data)):
        variants.append(["flip", pos, 0xFF, True])
        variants.append(["flip", pos, 1 << (pos % 8), pos % 2 == 0])
        variants.append(["cut", pos, 0, pos % 3 != 0])
    outcomes = child.run(base, str(tmp_path), variants)
    check(outcomes, variants)
    # Sanity of the oracle: most single-byte damage must be detected with verify=True.
    detected = sum(o.startswith("npzerror") for o, d in zip(outcomes, variants) if d[0] == "flip" and d[3])
    assert detected > len(data) // 2


@st.composite
def damages(draw, size: int) -> Damage:
    kind = draw(st.sampled_from(["flip", "flip", "cut", "zero", "insert"]))
    pos = draw(st.integers(0, size - 1))
    value = draw(st.integers(1, 255)) if kind == "flip" else draw(st.integers(1, 64))
    return [kind, pos, value, draw(st.booleans())]


@given(data=st.data(), arrays=array_dicts(max_size=3), compressed=st.booleans())
def test_random_damage_never_crashes(child, tmp_path_factory, data, arrays, compressed):
    raw = npz_bytes(arrays, compressed)
    workdir = tmp_path_factory.mktemp("damage")
    base = str(workdir / "base.npz")
    with open(base, "wb") as f:
        f.write(raw)
    variants = data.draw(st.lists(damages(len(raw)), min_size=20, max_size=40))
    # Several damages at once, too: each variant above is one; these stack three.
    for i in range(0, len(variants) - 2, 3):
        stacked = [v for v in variants[i : i + 3] if v[0] == "flip"]
        if stacked:
            variants.append(["multi", stacked, 0, variants[i][3]])
    check(child.run(base, str(workdir), variants), variants)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child_main()
