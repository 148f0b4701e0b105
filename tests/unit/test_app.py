"""changeflow.Changeflow: @app.on / app.route, stacking, names, task options, discovery, -A loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from changeflow import Changeflow, FieldChanged
from changeflow.app import AppError, load_app
from changeflow.listener.publish import task_queue, task_queues
from changeflow.listener.routes import compile_match, tasks_for
from changeflow.worker.idempotent import IdempotentTask
from changeflow.worker.settings import Settings, SettingsError, default_app_spec


def make_app(name: str = "acme") -> Changeflow:
    # No discovery in these tests: the package of this module is the test suite itself.
    return Changeflow(name, settings=Settings(), package="")


def change(coll: str, op: str, **fields: Any) -> dict[str, Any]:
    return {"_id": {"_data": "82AB"}, "operationType": op, "ns": {"db": "app", "coll": coll}, **fields}


def test_on_registers_a_guarded_task_under_celerys_name_and_routes_to_it() -> None:
    app = make_app()

    @app.on("invoices", "insert")
    def send_invoice(event: dict[str, Any]) -> None: ...

    assert send_invoice.name == f"{__name__}.send_invoice"
    assert isinstance(send_invoice, IdempotentTask)
    assert app.tasks[send_invoice.name] is send_invoice
    (route,) = app.routes
    assert route.collection == "invoices"
    assert (route.operation_types, route.tasks) == (("insert",), (send_invoice.name,))
    assert tasks_for(change("invoices", "insert"), app.routes) == [send_invoice.name]
    assert tasks_for(change("invoices", "update"), app.routes) == []


def test_operation_types_as_a_string_or_a_list() -> None:
    app = make_app()

    @app.on("orders", ["insert", "replace"], name="t.many")
    def many(event: dict[str, Any]) -> None: ...

    @app.on("orders", "delete", name="t.one")
    def one(event: dict[str, Any]) -> None: ...

    assert [r.operation_types for r in app.routes] == [("insert", "replace"), ("delete",)]
    assert tasks_for(change("orders", "replace"), app.routes) == ["t.many"]
    assert tasks_for(change("orders", "delete"), app.routes) == ["t.one"]


def test_stacked_decorators_add_routes_to_one_task() -> None:
    app = make_app()

    @app.on("invoices", "update", when=FieldChanged("status"))
    @app.on("invoices", "insert", match={"fullDocument.total": {"$gte": 1000}}, name="acme.notify_finance")
    def notify_finance(event: dict[str, Any]) -> None: ...

    assert notify_finance.name == "acme.notify_finance"
    assert [r.tasks for r in app.routes] == [("acme.notify_finance",), ("acme.notify_finance",)]
    assert [name for name in app.tasks if name.startswith("acme.")] == ["acme.notify_finance"]
    big = change("invoices", "insert", fullDocument={"total": 1500})
    small = change("invoices", "insert", fullDocument={"total": 999})
    status = change("invoices", "update", updateDescription={"updatedFields": {"status": "paid"}})
    other = change("invoices", "update", updateDescription={"updatedFields": {"note": "x"}})
    assert tasks_for(big, app.routes) == ["acme.notify_finance"]
    assert tasks_for(status, app.routes) == ["acme.notify_finance"]
    assert tasks_for(small, app.routes) == []
    assert tasks_for(other, app.routes) == []


def test_task_options_and_names_go_on_the_innermost_decorator() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="innermost"):

        @app.on("a", "insert", rate_limit="1/s")
        @app.on("a", "update", name="t.x")
        def x(event: dict[str, Any]) -> None: ...

    with pytest.raises(ValueError, match="stacked"):

        @app.on("a", "insert", name="t.other")
        @app.on("a", "update", name="t.y")
        def y(event: dict[str, Any]) -> None: ...


def test_a_second_task_with_a_taken_name_is_an_error() -> None:
    app = make_app()

    @app.on("users", "insert", name="tasks.welcome")
    def welcome(event: dict[str, Any]) -> None: ...

    with pytest.raises(ValueError, match=r"'tasks\.welcome' is already registered"):

        @app.on("users", "update", name="tasks.welcome")
        def welcome_again(event: dict[str, Any]) -> None: ...

    # The same function name in another module gets another default name: no clash.
    assert app.tasks["tasks.welcome"].run is welcome.run
    assert len(app.routes) == 1  # the refused declaration left no route behind


def test_task_options_pass_through_to_celery() -> None:
    app = make_app()

    @app.on("orders", "insert", name="t.opts", max_retries=2, rate_limit="10/m", time_limit=5, acks_late=True)
    def opts(event: dict[str, Any]) -> None: ...

    assert (opts.max_retries, opts.rate_limit, opts.time_limit, opts.acks_late) == (2, "10/m", 5, True)


def test_a_queue_of_its_own_passes_through_and_the_publishers_use_it() -> None:
    app = make_app()

    @app.on("orders", "insert", name="t.slow", queue="slow")
    def slow(event: dict[str, Any]) -> None: ...

    @app.on("orders", "insert", name="t.plain")
    def plain(event: dict[str, Any]) -> None: ...

    assert slow.queue == "slow"
    assert (task_queue(app, "t.slow"), task_queue(app, "t.plain")) == ("slow", None)
    assert task_queues(app, ["t.plain", "t.slow", "t.slow"]) == [app.conf.task_default_queue, "slow"]


def test_an_exchange_or_routing_key_of_its_own_is_refused_not_ignored() -> None:
    app = make_app()
    for option in ("exchange", "routing_key"):
        refused = f"{option}= is not supported: name the task's queue with queue="
        with pytest.raises(ValueError, match=refused):

            @app.on("orders", "insert", name=f"t.{option}", **{option: "elsewhere"})
            def elsewhere(event: dict[str, Any]) -> None: ...

        assert f"t.{option}" not in app.tasks


def test_base_must_keep_the_dedup_guard() -> None:
    app = make_app()
    from celery import Task

    with pytest.raises(TypeError, match="IdempotentTask"):

        @app.on("orders", "insert", name="t.unguarded", base=Task)
        def unguarded(event: dict[str, Any]) -> None: ...


def test_match_goes_into_the_compiled_match() -> None:
    app = make_app()
    query = {"fullDocument.total": {"$gte": 1000}}

    @app.on("invoices", "insert", match=query, name="t.big")
    def big(event: dict[str, Any]) -> None: ...

    assert compile_match(app.routes) == {
        "$and": [{"ns.coll": "invoices", "operationType": {"$in": ["insert"]}}, query]
    }


def test_a_bad_match_fails_at_declaration() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="unknown operator"):

        @app.on("invoices", "insert", match={"total": {"$bogus": 1}}, name="t.bad")
        def bad(event: dict[str, Any]) -> None: ...

    assert app.routes == ()
    assert "t.bad" not in app.tasks


def test_route_to_a_task_declared_elsewhere_and_the_start_up_check() -> None:
    app = make_app()
    assert app.route_problems() == ["app 'acme' has no routes (declare tasks with @app.on)"]
    app.route("orders", "delete", "billing.refund")
    (problem,) = app.route_problems()
    assert "'billing.refund', which app 'acme' does not have" in problem

    @app.task(name="billing.refund", base=IdempotentTask)
    def refund(event: dict[str, Any]) -> None: ...

    assert app.route_problems() == []
    assert tasks_for(change("orders", "delete"), app.routes) == ["billing.refund"]


def test_settings_argument_configures_celery() -> None:
    app = Changeflow("acme", settings=Settings(celery_broker_url="redis://broker.example:6380/3"), package="")
    assert app.conf.broker_url == "redis://broker.example:6380/3"
    assert app.conf.task_acks_late is True
    assert app.settings.celery_broker_url == "redis://broker.example:6380/3"


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_importing_changeflow_reads_no_environment() -> None:
    env = {**os.environ, "SMTP_PORT": "not-a-port", "CHANGEFLOW_APP": "!!"}
    result = run_python(
        """
        import sys
        import changeflow
        assert not any(m == "tasks" or m.startswith("tasks.") for m in sys.modules), "tasks imported"
        try:
            changeflow.Changeflow("x")
        except ValueError as exc:
            print("refused:", exc)
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: SMTP_PORT must be an integer" in result.stdout


def write_package(root: Path, name: str, files: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    for filename, text in {"__init__.py": "", **files}.items():
        (package / filename).parent.mkdir(parents=True, exist_ok=True)
        (package / filename).write_text(textwrap.dedent(text))


def test_discovery_imports_every_module_of_the_apps_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_package(
        tmp_path,
        "discpkg",
        {
            "effects.py": """
                from changeflow import Changeflow
                app = Changeflow("discpkg")

                @app.on("a", "insert")
                def first(event): ...
            """,
            "more.py": """
                from discpkg.effects import app

                @app.on("b", "insert")
                def second(event): ...
            """,
            "sub/__init__.py": "",
            "sub/deep.py": """
                from discpkg.effects import app
                app.route("c", "delete", "discpkg.more.second")
            """,
            "__main__.py": "raise SystemExit('__main__ must not be imported by discovery')\n",
            "test_effects.py": "raise SystemExit('test modules must not be imported by discovery')\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("discpkg.effects")
    assert app.package == "discpkg"
    expected = ["discpkg", "discpkg.effects", "discpkg.more", "discpkg.sub", "discpkg.sub.deep"]
    assert app.module_names() == expected
    assert {r.tasks[0] for r in app.routes} == {"discpkg.effects.first", "discpkg.more.second"}
    assert len(app.routes) == 3
    for name in [m for m in sys.modules if m == "discpkg" or m.startswith("discpkg.")]:
        monkeypatch.delitem(sys.modules, name)


def test_load_app_refuses_what_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_package(
        tmp_path,
        "refusepkg",
        {
            "plain.py": "from celery import Celery\napp = Celery('plain')\n",
            "empty.py": "from changeflow import Changeflow\napp = Changeflow('empty')\n",
            "unknown.py": """
                from changeflow import Changeflow
                app = Changeflow("unknown")
                app.route("orders", "insert", "nowhere.task")
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AppError, match="cannot load the app"):
        load_app("refusepkg.missing")
    with pytest.raises(AppError, match="is not a changeflow app"):
        load_app("refusepkg.plain")
    with pytest.raises(AppError, match="has no routes"):
        load_app("refusepkg.empty")
    with pytest.raises(AppError, match=r"'nowhere\.task', which app 'unknown' does not have"):
        load_app("refusepkg.unknown")
    for name in [m for m in sys.modules if m == "refusepkg" or m.startswith("refusepkg.")]:
        monkeypatch.delitem(sys.modules, name)


def test_default_app_spec_comes_from_changeflow_app() -> None:
    assert default_app_spec({}) == "worker"
    assert default_app_spec({"CHANGEFLOW_APP": " acme.effects "}) == "acme.effects"
    assert default_app_spec({"CHANGEFLOW_APP": "acme.effects:app"}) == "acme.effects:app"
    with pytest.raises(SettingsError, match="CHANGEFLOW_APP"):
        default_app_spec({"CHANGEFLOW_APP": "acme effects"})


def test_this_repositorys_app_keeps_the_cards_task_names_and_routes() -> None:
    from worker import app

    assert isinstance(app, Changeflow)
    names = {"tasks.send_welcome_email", "tasks.create_profile", "tasks.send_shipping_notification",
             "tasks.update_analytics",
             # The seed guide's catalogue (issue 14).
             "tasks.log_registration", "tasks.append_event", "tasks.invalidate_user_cache"}  # fmt: skip
    assert names <= set(app.tasks)
    realtime = {"tasks.push_new_post"}  # the guide's WebSocket updates (tasks/posts.py)
    assert realtime <= set(app.tasks)
    assert {t for r in app.routes for t in r.tasks} == names | realtime
    assert app.route_problems() == []
