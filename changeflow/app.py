"""The app object: a Celery app that also holds its routes, declared beside the tasks.

    app = Changeflow("acme")                    # settings from the environment, applied now

    @app.on("invoices", "insert")               # a task behind the dedup guard + a route to it
    def send_invoice(event): ...

    app.route("orders", "delete", "billing.refund")   # a route to a task declared elsewhere

Settings are read when an app is created (changeflow.worker.settings.get_settings, or `settings=`), never when
this module is imported. The modules of the package the app is created in are imported when the app
is loaded (`discover()`: the worker through Celery's loader, the listener and the operator commands
through `load_app`), so every `@app.on` in the package registers without a list of task modules.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery import Celery, Task
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from changeflow.listener.routes import FieldChanged, Route
from changeflow.worker.batches import BatchTask, batch_size, check_batch_size
from changeflow.worker.idempotent import IdempotentTask
from changeflow.worker.settings import Settings, SettingsError, default_app_spec, get_settings

__all__ = ["AppError", "Changeflow", "load_app"]


class AppError(ValueError):
    """An app that cannot run: not found, not a Changeflow app, no routes, a route to an unknown task."""


class Changeflow(Celery):
    """A changeflow application: a Celery app whose tasks run behind the dedup guard, plus its routes.

    `main` is Celery's app name (also the module prefix of tasks declared in `__main__`).
    `settings` replaces the environment's (tests, embedding applications); `package` names the package
    whose modules `discover()` imports (default: the package of the module that creates the app).
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        settings: Settings | None = None,
        package: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(main, **kwargs)
        self._routes: list[Route] = []
        self.package: str | None = package if package is not None else _creating_package()
        self.settings: Settings = self._configure_at_creation(settings)
        # Celery's documented discovery hook: the worker's loader imports these modules before it
        # consumes (related_name=None: each name is imported itself). The callable defers the walk.
        self.autodiscover_tasks(self.module_names, related_name=None)

    # Settings ----------------------------------------------------------------------------------

    def configure(self, settings: Settings | None = None) -> Settings:
        """(Re)apply `settings` (default: the environment's) and drop clients made with older ones."""
        from changeflow.worker import broker
        from changeflow.worker.app import celery_config
        from changeflow.worker.dedup import reset_dedup_store
        from changeflow.worker.mongo import reset_db
        from changeflow.worker.serialization import register_bson_types

        settings = settings if settings is not None else get_settings()
        register_bson_types()
        broker.install()
        self.conf.update(celery_config(settings))
        self.close()  # pooled broker connections may point at the previous broker
        # Celery 5.7's close() keeps the producer pool, whose connections point at the old broker.
        self.amqp._producer_pool = None
        reset_db()
        reset_dedup_store()
        self.settings = settings
        return settings

    def _configure_at_creation(self, settings: Settings | None) -> Settings:
        """configure(); bad settings under the `celery` command: one line on stderr and exit 2.

        Celery's command line would catch the SettingsError and print "Unable to load celery
        application" with the whole traceback. Anyone else gets the SettingsError (the listener and
        the operator commands report it as one line themselves).
        """
        try:
            return self.configure(settings)
        except SettingsError as exc:
            if not _loaded_by_celery_command():
                raise
            print(f"invalid settings: {exc}", file=sys.stderr)
            raise SystemExit(2) from None  # celery catches Exception only; 2 as for other usage errors

    # Tasks and routes ----------------------------------------------------------------------------

    @property
    def routes(self) -> tuple[Route, ...]:
        """The app's routes, in declaration order."""
        return tuple(self._routes)

    def on(
        self,
        collection: str,
        operation_types: str | Iterable[str],
        *,
        when: FieldChanged | None = None,
        match: Mapping[str, Any] | None = None,
        pre_images: bool = False,
        name: str | None = None,
        ordered_by: bool | str | None = None,
        batch: int | None = None,
        **task_options: Any,
    ) -> Callable[[Callable[..., Any] | Task], Task]:
        """Register the function as a task behind the dedup guard and route these events to it.

        `pre_images=True`: the events carry `fullDocumentBeforeChange` (changeflow.listener.routes.Route).

        Stacked decorators add routes to the same task; its name and task options go on the
        innermost one. `name` defaults to Celery's naming (`module.function`); a name already taken
        raises. `task_options` pass through to Celery (`max_retries`, `rate_limit`, `queue`, ...).
        `ordered_by` ("documentKey", True for it, or a payload field path) runs the task's messages
        one at a time per key, in stream order (docs/ordering.md); it is the task's, for all its routes.
        `batch=N` makes a batched task: the function takes a list of at most N events (grouped by the
        listener), each behind its own dedup key (changeflow/worker/batches.py, docs/batches.md); a task
        option, so on the innermost @app.on.
        """

        def decorator(target: Callable[..., Any] | Task) -> Task:
            if isinstance(target, Task):  # an inner @app.on already made the task
                task = target
                if task.app is not self:
                    raise ValueError(f"@app.on on task {task.name!r} of another app")
                if name is not None and name != task.name:
                    raise ValueError(f"stacked @app.on names {name!r}, the task is {task.name!r}")
                if batch is not None:
                    raise ValueError(f"batch= for {task.name!r} goes on the innermost @app.on")
                if task_options:
                    raise ValueError(
                        f"task options for {task.name!r} go on the innermost @app.on, "
                        f"got {sorted(task_options)} on an outer one"
                    )
                self.route(
                    collection,
                    operation_types,
                    task.name,
                    when=when,
                    match=match,
                    ordered_by=ordered_by,
                    pre_images=pre_images,
                )
                return task
            task_name = name or self.gen_task_name(target.__name__, target.__module__)
            # The route first: a bad route must not leave a registered task behind.
            route = self._checked_route(
                collection, operation_types, task_name, when, match, ordered_by, pre_images
            )
            options = _batched(task_name, batch, route, task_options) if batch is not None else task_options
            task = self._register(target, task_name, options)
            self._routes.append(route)
            return task

        return decorator

    def route(
        self,
        collection: str,
        operation_types: str | Iterable[str],
        task_name: str,
        *,
        when: FieldChanged | None = None,
        match: Mapping[str, Any] | None = None,
        ordered_by: bool | str | None = None,
        pre_images: bool = False,
    ) -> Route:
        """Route these events to `task_name`, a task this app has or will have once discovered.

        Checked when the app is loaded (`route_problems`): the listener and the worker refuse a
        route to a task the app does not have.
        """
        route = self._checked_route(
            collection, operation_types, task_name, when, match, ordered_by, pre_images
        )
        self._routes.append(route)
        return route

    def _checked_route(
        self,
        collection: str,
        operation_types: str | Iterable[str],
        task_name: str,
        when: FieldChanged | None,
        match: Mapping[str, Any] | None,
        ordered_by: bool | str | None,
        pre_images: bool,
    ) -> Route:
        """A route to `task_name`, refused if its ordering disagrees with the task's other routes."""
        route = Route(
            collection,
            operation_types,
            [task_name],
            when=when,
            match_query=match,
            ordered_by=ordered_by,
            pre_images=pre_images,
        )
        self._check_ordering(route)
        return route

    def _check_ordering(self, route: Route) -> None:
        """A task has one ordering: routes to it must not name different `ordered_by` paths."""
        if route.ordered_by:
            for task_name in route.tasks:
                if batch_size(self._tasks.get(task_name)) is not None:  # _tasks: no finalize here
                    raise ValueError(f"task {task_name!r} is batched: it cannot be ordered_by as well")
        for other in self._routes:
            for task_name in set(route.tasks) & set(other.tasks):
                if route.ordered_by and other.ordered_by and route.ordered_by != other.ordered_by:
                    raise ValueError(
                        f"task {task_name!r} is ordered_by {other.ordered_by!r} already, "
                        f"another route names {route.ordered_by!r}"
                    )

    def _register(self, fn: Callable[..., Any], task_name: str, options: dict[str, Any]) -> Task:
        unrouted = sorted(set(options) & _DESTINATION_OPTIONS)
        if unrouted:
            # The listener's publishers send a task to its queue (`queue=`, see
            # changeflow.listener.publish.task_queue); an exchange or routing key of its own would be
            # ignored on Redis and strand the task: refused rather than silently dropped.
            raise ValueError(
                f"task {task_name!r}: {', '.join(unrouted)}= is not supported: name the task's queue "
                "with queue= (workers consume it with `celery -A APP worker -Q QUEUE`)"
            )
        base = options.pop("base", IdempotentTask)
        if not (isinstance(base, type) and issubclass(base, IdempotentTask)):
            raise TypeError(f"task {task_name!r}: base must subclass IdempotentTask (the dedup guard)")
        existing = self.tasks.get(task_name)
        if existing is not None:
            raise ValueError(
                f"task name {task_name!r} is already registered ({_where(existing)}); "
                f"cannot register {fn.__module__}.{fn.__qualname__} under it (pass name=...)"
            )
        # lazy=False: the Task itself, not Celery's promise, so a stacked @app.on can recognise it.
        # shared=False: a task belongs to its app; Celery's default would add it to every app made
        # later in the process, where its name could then clash with that app's own task.
        options.setdefault("shared", False)
        task: Task = self.task(name=task_name, base=base, lazy=False, **options)(fn)
        if task.run is not fn:  # Celery returns the registered task when the name was taken
            raise ValueError(f"task name {task_name!r} is already registered ({_where(task)})")
        return task

    def route_problems(self, *, require_routes: bool = True) -> list[str]:
        """What keeps this app from running, one line each: no routes, a route to an unknown task."""
        problems: list[str] = []
        if require_routes and not self._routes:
            problems.append(f"app {self.main!r} has no routes (declare tasks with @app.on)")
        known = self.tasks
        for route in self._routes:
            for task_name in route.tasks:
                if task_name not in known:
                    problems.append(
                        f"route on {route.collection!r} {list(route.operation_types)} names task "
                        f"{task_name!r}, which app {self.main!r} does not have"
                    )
                elif route.ordered_by and batch_size(known[task_name]) is not None:
                    problems.append(f"task {task_name!r} is batched: it cannot be ordered_by as well")
        return problems

    # Discovery ---------------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        """Every module of the app's package (test modules and `__main__` left out), package first."""
        if not self.package:
            return []
        package = importlib.import_module(self.package)
        names = [self.package]
        path = getattr(package, "__path__", None)
        if path is None:  # the app lives in a top-level module: nothing else to find
            return names

        def fail(name: str) -> None:
            raise ImportError(f"discovering {self.package}: cannot import {name}")

        for info in pkgutil.walk_packages(path, prefix=f"{self.package}.", onerror=fail):
            if not _skipped(info.name):
                names.append(info.name)
        return names

    def discover(self) -> list[str]:
        """Import every module of the app's package (module_names), so every @app.on registers."""
        names = self.module_names()
        for name in names:
            importlib.import_module(name)
        return names


# Task options that choose where a message goes besides `queue=`: not honoured by the publishers.
_DESTINATION_OPTIONS = frozenset({"exchange", "routing_key"})


def _batched(task_name: str, batch: object, route: Route, options: dict[str, Any]) -> dict[str, Any]:
    """The task options of a batched task (`batch=`), refused when they cannot go together."""
    size = check_batch_size(task_name, batch)
    if route.ordered_by:
        raise ValueError(f"task {task_name!r}: batch= and ordered_by= cannot go together")
    base = options.get("base", BatchTask)
    if not (isinstance(base, type) and issubclass(base, BatchTask)):
        raise TypeError(f"task {task_name!r}: a batched task's base must subclass BatchTask")
    return {**options, "base": base, "batch_size": size}


def _skipped(module: str) -> bool:
    # Importing __main__ would run a command; test modules need test tools and declare no effects.
    parts = module.split(".")
    return any(p == "__main__" or p in ("tests", "test", "conftest") or p.startswith("test_") for p in parts)


def _where(task: Task) -> str:
    run = getattr(task, "run", None)
    module = getattr(run, "__module__", "?")
    qualname = getattr(run, "__qualname__", "?")
    return f"by {module}.{qualname}"


def _creating_package() -> str | None:
    """The package of the module whose code called Changeflow(...) (subclasses' frames skipped)."""
    frame = sys._getframe(2)  # _creating_package <- __init__ <- the caller
    while frame is not None and isinstance(frame.f_locals.get("self"), Changeflow):
        frame = frame.f_back
    if frame is None:
        return None
    module_name = frame.f_globals.get("__name__")
    if not isinstance(module_name, str) or module_name == "__main__":
        return None
    module = sys.modules.get(module_name)
    if module is not None and hasattr(module, "__path__"):
        return module_name  # created in a package's __init__
    return module_name.rpartition(".")[0] or module_name


def _loaded_by_celery_command() -> bool:
    import click

    context = click.get_current_context(silent=True)
    if context is None:
        return False
    from celery.bin.celery import celery as celery_command

    return context.find_root().command is celery_command


def load_app(spec: str | None = None) -> Changeflow:
    """The app `spec` names (`-A`, as Celery finds it: `pkg.module` or `pkg.module:attr`), discovered.

    No spec: CHANGEFLOW_APP, else this repository's app (`worker`). AppError when it cannot be found,
    is not a Changeflow app, has no routes or routes to a task it does not have; SettingsError
    (a ValueError too) when the environment's settings are invalid.
    """
    from celery.app.utils import find_app

    spec = spec or default_app_spec()
    try:
        app = find_app(spec)
    except (ImportError, AttributeError) as exc:
        raise AppError(f"-A {spec}: cannot load the app: {exc}") from None
    if not isinstance(app, Changeflow):
        raise AppError(f"-A {spec}: {app!r} is not a changeflow app (create it with changeflow.Changeflow)")
    try:
        app.discover()
    except ImportError as exc:
        raise AppError(f"-A {spec}: discovering the app's modules: {exc}") from exc
    problems = app.route_problems()
    if problems:
        raise AppError(f"-A {spec}: {problems[0]}")
    return app


@worker_init.connect
def _refuse_unroutable_app(sender: Any = None, **_: Any) -> None:
    """A worker refuses an app without routes or with a route to an unknown task: one line, exit 2.

    worker_init is sent after the loader imported the discovered modules, before anything is consumed.
    """
    app = getattr(sender, "app", None)
    if not isinstance(app, Changeflow):
        return
    problems = app.route_problems()
    if problems:
        print(f"invalid app: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)


@worker_process_init.connect
def _start_tracing(**_: Any) -> None:
    """Traces in each (prefork) worker process when OpenTelemetry is configured (changeflow/tracing.py);
    in the child, as the SDK's export thread does not survive the fork."""
    from changeflow import tracing

    tracing.setup("changeflow-worker")


@worker_init.connect
def _start_tracing_in_worker(sender: Any = None, **_: Any) -> None:
    """Traces in the worker process itself under a pool that runs tasks there without forking (threads,
    gevent): Celery sends worker_process_init from prefork children (and the solo pool) only."""
    if not _pool_forks(sender):
        from changeflow import tracing

        tracing.setup("changeflow-worker")


def _pool_forks(worker: Any) -> bool:
    """Whether the worker's pool is prefork (`-P`/worker_pool: a name or, from the CLI, a class)."""
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = concurrency.get_implementation(getattr(worker, "pool_cls", None) or "prefork")
    return isinstance(pool, type) and issubclass(pool, PreforkPool)


@worker_process_shutdown.connect
def _flush_traces(**_: Any) -> None:
    from changeflow import tracing

    tracing.shutdown()


@worker_shutdown.connect
def _flush_worker_traces(**_: Any) -> None:
    # threads/gevent: the worker process's own spans (no pool process sends worker_process_shutdown);
    # a prefork main process has no tracing set up, and this does nothing.
    from changeflow import tracing

    tracing.shutdown()
