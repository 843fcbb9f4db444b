"""Bad input: a one-line error naming the problem and the fix, exit status 1, no traceback, no file."""

from __future__ import annotations

import pytest

from conftest import free_port, run_uniil_process, server_args


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_dataset_lists_known_ones(tmp_path):
    proc = run_uniil_process("attrs", "build", "--dataset", "cifar1000", "--pool", tmp_path / "p.duckdb")
    assert_one_line_error(proc, "unknown dataset 'cifar1000'", "cifar100", "domainnet", "synthetic")
    assert not list(tmp_path.iterdir())


def test_missing_api_key_writes_nothing(tmp_path):
    proc = run_uniil_process("attrs", "build", "--dataset", "synthetic", "--pool", tmp_path / "p.duckdb",
                             "--llm", "openai:gpt-4o-mini", "--clip-model", "uniil-tiny", env={"OPENAI_API_KEY": ""})
    assert_one_line_error(proc, "OPENAI_API_KEY")
    assert not list(tmp_path.iterdir())


def test_unreachable_server_after_retries_writes_nothing(tmp_path):
    proc = run_uniil_process("attrs", "build", "--dataset", "synthetic", "--pool", tmp_path / "p.duckdb",
                             "--llm-url", f"http://127.0.0.1:{free_port()}/v1", "--llm-model", "m",
                             "--clip-model", "uniil-tiny", "--retries", "3", "--backoff", "0.05")
    assert_one_line_error(proc, "cannot reach the LLM server", "after 3 tries", "--llm-url")
    assert not list(tmp_path.iterdir())


def test_unreadable_classes_file(tmp_path):
    bad = tmp_path / "classes.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    proc = run_uniil_process("attrs", "build", "--classes", bad, "--pool", tmp_path / "p.duckdb")
    assert_one_line_error(proc, "cannot read classes file", "one class name per line")
    proc = run_uniil_process("attrs", "build", "--classes", tmp_path / "missing.txt", "--pool", tmp_path / "p.duckdb")
    assert_one_line_error(proc, "missing.txt")
    assert not (tmp_path / "p.duckdb").exists()


def test_pool_of_another_backbone_is_refused(tmp_path, llm_server):
    pool = tmp_path / "p.duckdb"
    classes = tmp_path / "c.txt"
    classes.write_text("circle\n")
    ok = run_uniil_process("attrs", "build", "--pool", pool, "--classes", classes, "--domains", "",
                           "--templates", "class-appearance", *server_args(llm_server))
    assert ok.returncode == 0, ok.stderr
    before = pool.read_bytes()
    args = [a if a != "uniil-tiny" else "ViT-B-32" for a in server_args(llm_server)]
    proc = run_uniil_process("attrs", "build", "--pool", pool, "--classes", classes, "--domains", "",
                             "--templates", "class-appearance", *args, "--clip-pretrained", "none")
    assert_one_line_error(proc, "built with backbone uniil-tiny@seed0", "ViT-B-32@none")
    assert pool.read_bytes() == before


@pytest.mark.parametrize("args, needle", [
    (["--dedupe-threshold", "1.5"], "--dedupe-threshold 1.5 is outside"),
    (["--llm", "gpt4"], "unknown --llm 'gpt4'"),
    (["--llm-url", "http://127.0.0.1:9/v1"], "--llm-url needs --llm-model"),
    (["--llm", "local", "--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m"], "either --llm or --llm-url"),
    (["--templates", "class-appearance,poem"], "unknown prompt template(s) poem"),
    (["--llm", "local:/nope/model.gguf"], "GGUF model file /nope/model.gguf not found"),
    (["--clip-model", "ViT-B-99"], "unknown CLIP model 'ViT-B-99'"),
])
def test_bad_options(tmp_path, args, needle, llm_server):
    if args[0] == "--clip-model":  # reaches backbone loading: give it a server to ask first
        args = ["--llm-url", llm_server.base_url, "--llm-model", "m", "--templates", "class-appearance",
                "--classes", str(write(tmp_path / "c.txt", "circle\n")), "--domains", "", *args]
    else:
        args = ["--dataset", "synthetic", *args]
    proc = run_uniil_process("attrs", "build", "--pool", tmp_path / "p.duckdb", *args)
    assert_one_line_error(proc, needle)


def write(path, text):
    path.write_text(text)
    return path


def test_pretrained_weights_offline_names_the_offline_options(tmp_path, llm_server):
    classes = write(tmp_path / "c.txt", "circle\n")
    proc = run_uniil_process("attrs", "build", "--pool", tmp_path / "p.duckdb", "--classes", classes, "--domains", "",
                             "--templates", "class-appearance", "--llm-url", llm_server.base_url, "--llm-model", "m",
                             "--clip-model", "ViT-B-32", "--clip-pretrained", "openai", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "cannot load weights 'openai' for ViT-B-32", "--clip-pretrained", "uniil-tiny")
    assert not (tmp_path / "p.duckdb").exists()  # answers kept in the work file, the pool is not claimed
    assert (tmp_path / "p.duckdb.partial").exists()


def test_readers_on_missing_or_foreign_files(tmp_path):
    assert_one_line_error(run_uniil_process("attrs", "stats", "--pool", tmp_path / "none.duckdb"),
                          "not found", "uniil attrs build")
    import duckdb
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (x INT)").close()
    assert_one_line_error(run_uniil_process("attrs", "list", "--pool", other), "is not a uniil attribute pool")
    junk = write(tmp_path / "junk.duckdb", "not a database")
    assert_one_line_error(run_uniil_process("attrs", "stats", "--pool", junk), "cannot open pool")
    bad = write(tmp_path / "bad.jsonl", "{not json}\n")
    assert_one_line_error(run_uniil_process("attrs", "ingest", bad, "--pool", tmp_path / "none.duckdb"),
                          "bad.jsonl:1 is not a Batch API result line")
