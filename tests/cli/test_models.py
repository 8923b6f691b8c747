"""ragmesh models against real llm services: the serving model, generation settings
changed and confirmed, loads followed to the end."""


async def test_status_and_list_show_the_model_serving(cli):
    status = await cli("models", "status")
    assert status.code == 0, status.err
    assert "READY" in status.out and "SmolLM2-135M-Instruct" in status.out
    assert "max_new_tokens" in status.out
    as_json = (await cli("models", "status", "--json")).json()
    assert as_json["state"] == "MODEL_STATE_READY"

    models = (await cli("models", "list", "--json")).json()["models"]
    assert [m["id"] for m in models if m["loaded"]] == ["SmolLM2-135M-Instruct"]
    assert "SmolLM2-135M-Instruct" in (await cli("models", "list")).out


async def test_config_set_prints_the_settings_confirmed_and_their_revision(cli):
    before = (await cli("models", "config", "--json")).json()

    run = await cli(
        "models",
        "config",
        "--set",
        "temperature=0",
        "--set",
        "top_k=20",
        "--set",
        "stop_sequences=THE END",
        "--set",
        "stop_sequences=FIN",
    )
    assert run.code == 0, run.err
    revision = int(before["revision"]) + 1
    assert f"applied: revision {revision}" in run.out
    assert "'THE END', 'FIN'" in run.out
    after = (await cli("models", "config", "--json")).json()
    assert (after["temperature"], after["topK"]) == (0, 20)
    assert after["stopSequences"] == ["THE END", "FIN"]
    assert after["topP"] == before["topP"]  # not in the mask: unchanged

    cleared = (await cli("models", "config", "--set", "stop_sequences=", "--json")).json()
    assert cleared["stopSequences"] == []
    assert int(cleared["revision"]) == revision + 1

    # A value the service refuses: its reason, and nothing changed.
    refused = await cli("models", "config", "--set", "temperature=5")
    assert refused.code == 1
    assert refused.err.startswith("error: ") and "temperature" in refused.err
    assert refused.err.count("\n") == 1
    unchanged = (await cli("models", "config", "--json")).json()
    assert unchanged["revision"] == cleared["revision"]


async def test_settings_need_the_admin_scope(cli):
    run = await cli("--api-key", "reader-key", "models", "config", "--set", "temperature=0.5")
    assert run.code == 1
    assert "refused: this call needs the scope 'admin'" in run.err
    # Reading them does not.
    assert (await cli("--api-key", "reader-key", "models", "config")).code == 0


async def test_load_follows_the_model_until_it_serves_then_unload(cli, spare_llm):
    spare = {**cli.targets, "llm": spare_llm}
    assert (await cli("models", "status", "--json", targets=spare)).json()["state"] == (
        "MODEL_STATE_NOT_LOADED"
    )

    loaded = await cli("models", "load", "tiny", targets=spare)
    assert loaded.code == 0, loaded.err
    assert "READY" in loaded.out
    status = (await cli("models", "status", "--json", targets=spare)).json()
    assert (status["state"], status["model"]) == ("MODEL_STATE_READY", "tiny")

    unloaded = (await cli("models", "unload", "--json", targets=spare)).json()
    assert unloaded["state"] in ("MODEL_STATE_UNLOADING", "MODEL_STATE_NOT_LOADED")
    assert (await cli("models", "status", "--json", targets=spare)).json()["state"] == (
        "MODEL_STATE_NOT_LOADED"
    )

    missing = await cli("models", "load", "no-such-model", targets=spare)
    assert missing.code == 1
    assert missing.err == "error: no model at no-such-model under the models folder\n"
