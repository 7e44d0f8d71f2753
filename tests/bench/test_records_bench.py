"""`slsg bench records` on the toy model: three real gateways, nothing lost, every figure present."""

from __future__ import annotations

from test_bench import positive, run_json, toy_repository  # noqa: F401  (the fixture)


def test_bench_records_compares_off_on_and_all_flagged(toy_repository, capsys) -> None:  # noqa: F811
    report = run_json(capsys, "records", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--frame-size", "320x256", "--concurrency", "2", "--requests", "6", "--rounds", "2")
    assert set(report["requests_per_s"]) == {"off", "on, all normal", "on, all flagged"}
    assert all(f == 0 for f in report["failures"].values())
    for variant in ("on, all normal", "on, all flagged"):
        assert positive(report["ratio_vs_off"][variant])
        assert len(report["cpu_ms_per_request"][variant]["rounds"]) == 2  # one CPU reading per round (Linux)
        # every request sent was recorded: the writer flushed on SIGTERM
        assert report["stored"][variant]["records"] == report["requests_sent"][variant]
    flagged = report["stored"]["on, all flagged"]
    assert flagged["with_frame"] == flagged["records"] and flagged["file_bytes"] > 0
    normal = report["stored"]["on, all normal"]
    assert normal["with_frame"] < normal["records"] / 2  # a 1 % sample of normal frames
