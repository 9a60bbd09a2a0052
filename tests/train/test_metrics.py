"""The demo's machine readings: CPU steal from /proc/stat (fields: user nice system idle iowait irq softirq steal
guest guest_nice; guest time is already inside user)."""

from __future__ import annotations

from ringlwm.train.metrics import cpu_times, steal_fraction


def test_steal_is_the_eighth_field_over_the_first_eight(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 10 1 2 32 7 0\ncpu0 50 2 25 400 5 0 1 16 3 0\nintr 1\n")
    assert cpu_times(stat) == (32, 1000)
    stat.write_text("cpu  160 5 60 900 10 1 2 132 9 0\n")
    assert steal_fraction((32, 1000), cpu_times(stat)) == 100 / 270
    assert cpu_times(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    assert cpu_times(stat) is None
    assert steal_fraction(None, (1, 2)) is None and steal_fraction((1, 2), (1, 2)) is None
