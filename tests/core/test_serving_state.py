"""The desired-state file NAME/serving.json (slsg.contract) and the ``slsg deploy`` command that writes it."""

from __future__ import annotations

import json
import shutil

import pytest

from slsg.contract import (
    SERVING_FILENAME, ServingStateError, model_path, models_with_serving_state, parse_serving_state,
    read_serving_state, serving_path, write_serving_state,
)
from support import run_slsg


@pytest.fixture()
def repository(tmp_path, contract_repository):
    """The toy model with versions 1 and 2 (the same file twice: only the numbers matter here)."""
    root = tmp_path / "repo"
    shutil.copytree(contract_repository.root, root)
    model_path(root, "toy", 2).parent.mkdir()
    shutil.copy(model_path(root, "toy", 1), model_path(root, "toy", 2))
    return root


def test_write_then_read_round_trips_and_records_the_replaced_version(repository):
    first = write_serving_state(repository, "toy", 2)
    assert first.previous is None and first.updated.endswith("+00:00")
    second = write_serving_state(repository, "toy", 1)
    assert read_serving_state(repository, "toy") == second
    assert (second.model, second.version, second.previous) == ("toy", 1, 2)
    assert json.loads(serving_path(repository, "toy").read_text())["version"] == 1
    # atomic: a temporary file then a rename, nothing left beside the file
    assert sorted(p.name for p in (repository / "toy").iterdir() if not p.is_dir()) == ["config.pbtxt",
                                                                                         SERVING_FILENAME]
    assert models_with_serving_state(repository) == ["toy"]


def test_no_file_means_no_desired_state(repository):
    assert read_serving_state(repository, "toy") is None
    assert models_with_serving_state(repository) == []


def test_a_version_the_repository_does_not_hold_is_refused(repository):
    with pytest.raises(ServingStateError, match=r"version 7 of 'toy' is not in .*servable versions: \[1, 2\]"):
        write_serving_state(repository, "toy", 7)
    with pytest.raises(ServingStateError, match="no servable version of 'nothing'"):
        write_serving_state(repository, "nothing", 1)
    assert not serving_path(repository, "toy").exists()


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"model": "toy"}', "'version' must be a whole number >= 1, got None"),
    ('{"version": "2"}', "'version' must be a whole number >= 1, got '2'"),
    ('{"version": true}', "'version' must be a whole number >= 1, got True"),
    ('{"version": 0}', "'version' must be a whole number >= 1, got 0"),
    ('{"version": 2, "model": "other"}', "names model 'other' but lies in the folder of 'toy'"),
    ('{"version": 2, "previous": -1}', "'previous' must be null or a whole number >= 1"),
])
def test_unusable_files_are_refused_naming_file_and_problem(repository, text, problem):
    serving_path(repository, "toy").write_text(text)
    with pytest.raises(ServingStateError) as error:
        read_serving_state(repository, "toy")
    assert str(serving_path(repository, "toy")) in str(error.value) and problem in str(error.value)


def test_unknown_fields_are_ignored_and_model_may_be_left_out(repository):
    state = parse_serving_state('{"version": 2, "ticket": "CHG-12"}', "toy")
    assert (state.model, state.version, state.previous) == ("toy", 2, None)


def test_a_broken_file_is_repaired_by_writing_a_good_one(repository):
    serving_path(repository, "toy").write_text("{broken")
    state = write_serving_state(repository, "toy", 1)
    assert read_serving_state(repository, "toy") == state and state.previous is None


def test_folders_that_are_not_model_names_are_not_listed(repository):
    odd = repository / "lost+found"
    odd.mkdir()
    (odd / SERVING_FILENAME).write_text('{"version": 1}')
    write_serving_state(repository, "toy", 1)
    assert models_with_serving_state(repository) == ["toy"]


def test_slsg_deploy_latest_then_rollback(repository):
    out = run_slsg("deploy", "toy", "--latest", "--repository", repository).stdout
    assert "toy: every gateway will serve version 2 (first deploy)" in out
    out = run_slsg("deploy", "toy", "--version", "1", "--repository", repository).stdout
    assert "version 1 (was 2)" in out and str(serving_path(repository, "toy")) in out
    assert read_serving_state(repository, "toy").version == 1


@pytest.mark.parametrize(("args", "message"), [
    (["toy", "--version", "5"], "version 5 of 'toy' is not in"),
    (["nothing", "--latest"], "no servable version of 'nothing'"),
    (["../etc", "--latest"], "invalid model name '../etc'"),
    (["toy"], "one of the arguments --version --latest is required"),
    (["toy", "--version", "1", "--latest"], "not allowed with argument"),
])
def test_slsg_deploy_refuses_with_a_clear_message(repository, args, message):
    proc = run_slsg("deploy", *args, "--repository", repository, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not serving_path(repository, "toy").exists()
