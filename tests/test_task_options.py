"""The @task decorator: its two forms, what the task object exposes, and every option check at decoration time."""

import functools
import math

import pytest

import taskrun
from taskrun import BaseTaskRun, SequentialTaskRun, Task, ThreadTaskRun, task


def plain(x, y=1):
    """Add two numbers."""
    return x + y


# ---- the two forms and what the task keeps of the function ------------------------------


def test_bare_form_makes_a_task_that_runs():
    inc = task(plain)
    assert isinstance(inc, Task)
    assert inc(1).get_result(timeout=5) == 2


def test_options_form_makes_a_task_that_runs():
    inc = task(retries=1, runner=SequentialTaskRun)(plain)
    assert isinstance(inc, Task)
    assert inc(1, y=5).get_result(timeout=5) == 6


def test_decorator_syntax_both_forms():
    @task
    def a(x):
        return x * 2

    @task(name="bee", runner=SequentialTaskRun)
    def b(x):
        return x * 3

    assert a(2).get_result(timeout=5) == 4
    assert b(2).get_result(timeout=5) == 6
    assert b.name == "bee"


def test_wraps_keeps_name_doc_module_and_wrapped():
    t = task(plain)
    assert t.__name__ == "plain"
    assert t.__qualname__ == "plain"
    assert t.__doc__ == "Add two numbers."
    assert t.__module__ == __name__
    assert t.__wrapped__ is plain
    # what functools.wraps would give a wrapper function, the task has too
    reference = functools.wraps(plain)(lambda: None)
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        assert getattr(t, attr) == getattr(reference, attr)


def test_exposes_fn_name_and_options():
    t = task(retries=3, retry_sleep_time=0.5, runner=SequentialTaskRun)(plain)
    assert t.fn is plain
    assert t.fn(1, 2) == 3  # the plain function, callable directly, no handle
    assert t.name == "plain"
    assert t.retries == 3
    assert t.retry_sleep_time == 0.5
    assert t.runner is SequentialTaskRun


def test_defaults():
    t = task(plain)
    assert t.retries == 0
    assert t.retry_sleep_time == 0
    assert t.backoff == 1.0
    assert t.jitter == 0
    assert t.timeout is None
    assert t.retry_on == (Exception,)
    assert isinstance(t.runner, type) and issubclass(t.runner, BaseTaskRun)


def test_default_name_is_the_qualname():
    def local_fn():
        return 1

    t = task(local_fn)
    assert t.name == local_fn.__qualname__
    assert t.name.endswith("test_default_name_is_the_qualname.<locals>.local_fn")

    class Holder:
        @staticmethod
        def method():
            return 2

    assert task(Holder.method).name.endswith("Holder.method")


def test_name_option_is_used_by_handles():
    t = task(name="fetch", runner=SequentialTaskRun)(plain)
    run = t(1)
    assert t.name == "fetch"
    assert run.name == "fetch"
    assert run.id.startswith("fetch#")
    # the function keeps its own name; only the label changes
    assert t.__name__ == "plain"


def test_retry_on_single_class_is_normalised_to_a_tuple():
    assert task(retry_on=KeyError)(plain).retry_on == (KeyError,)
    assert task(retry_on=(KeyError, OSError))(plain).retry_on == (KeyError, OSError)


def test_wrapping_a_task_again_wraps_the_plain_function():
    inner = task(plain)
    outer = task(retries=2, runner=SequentialTaskRun)(inner)
    assert outer.fn is plain
    assert outer.retries == 2
    assert outer(1).get_result() == 2


def test_callable_object_and_lambda_targets():
    class Doubler:
        def __call__(self, x):
            return 2 * x

    t = task(runner=SequentialTaskRun)(Doubler())
    assert t.name == "Doubler"
    assert t(4).get_result() == 8
    lam = task(runner=SequentialTaskRun)(lambda x: x - 1)
    assert lam.name.endswith("<locals>.<lambda>")
    assert lam(4).get_result() == 3


def test_repr_names_the_task_and_runner():
    t = task(name="fetch", runner=SequentialTaskRun)(plain)
    assert repr(t) == "<Task fetch runner=SequentialTaskRun>"


def test_options_do_not_leak_between_tasks():
    a = task(retries=5, runner=SequentialTaskRun)(plain)
    b = task(plain)
    assert a.retries == 5
    assert b.retries == 0
    assert a.runner is SequentialTaskRun
    assert b.runner is not SequentialTaskRun


# ---- option checks: all at decoration time -------------------------------------------------


def _decorate(**options):
    """Fail at the options step (@task(...)); the function is never needed."""
    return task(**options)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"retries": -1}, ValueError, ["retries", "-1"]),
        ({"retries": 2.5}, TypeError, ["retries", "2.5"]),
        ({"retries": "3"}, TypeError, ["retries", "'3'"]),
        ({"retries": True}, TypeError, ["retries", "True"]),
        ({"retries": None}, TypeError, ["retries", "None"]),
        ({"retry_sleep_time": -0.1}, ValueError, ["retry_sleep_time", "-0.1"]),
        ({"retry_sleep_time": "1"}, TypeError, ["retry_sleep_time", "'1'"]),
        ({"retry_sleep_time": math.nan}, ValueError, ["retry_sleep_time", "nan"]),
        ({"backoff": 0.5}, ValueError, ["backoff", "0.5"]),
        ({"backoff": 0}, ValueError, ["backoff", "0"]),
        ({"backoff": "2"}, TypeError, ["backoff", "'2'"]),
        ({"jitter": -1}, ValueError, ["jitter", "-1"]),
        ({"jitter": [0.1]}, TypeError, ["jitter", "[0.1]"]),
        ({"timeout": 0}, ValueError, ["timeout", "0"]),
        ({"timeout": -5}, ValueError, ["timeout", "-5"]),
        ({"timeout": "30"}, TypeError, ["timeout", "'30'"]),
        ({"timeout": math.nan}, ValueError, ["timeout", "nan"]),
        ({"timeout": math.inf}, ValueError, ["timeout", "inf", "None"]),
        ({"backoff": math.inf}, ValueError, ["backoff", "inf", "finite"]),
        ({"jitter": math.inf}, ValueError, ["jitter", "inf"]),
        ({"retry_sleep_time": math.inf}, ValueError, ["retry_sleep_time", "inf"]),
        ({"retry_on": 5}, TypeError, ["retry_on", "5"]),
        ({"retry_on": ()}, TypeError, ["retry_on", "()"]),
        ({"retry_on": (ValueError, "KeyError")}, TypeError, ["retry_on", "KeyError"]),
        ({"retry_on": int}, TypeError, ["retry_on", "int"]),
        ({"retry_on": ValueError("x")}, TypeError, ["retry_on", "ValueError"]),
        ({"runner": object}, TypeError, ["runner", "object"]),
        ({"runner": "thread"}, TypeError, ["runner", "'thread'"]),
        ({"runner": 42}, TypeError, ["runner", "42"]),
        ({"key": "url"}, TypeError, ["key", "'url'"]),
        ({"name": ""}, TypeError, ["name", "''"]),
        ({"name": 7}, TypeError, ["name", "7"]),
        ({"ledger": 3.5}, TypeError, ["ledger", "3.5"]),
    ],
)
def test_bad_option_fails_at_decoration_naming_option_and_value(options, error, words):
    with pytest.raises(error) as info:
        _decorate(**options)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    ("options", "error"), [({"retries": -1}, ValueError), ({"backoff": 0.5}, ValueError), ({"runner": dict}, TypeError)]
)
def test_bad_option_also_fails_when_given_with_the_function(options, error):
    # Task(...) directly: the same checks apply
    with pytest.raises(error):
        Task(plain, **options)


def test_runner_instance_is_rejected():
    run = task(runner=SequentialTaskRun)(plain)(1)
    with pytest.raises(TypeError, match="runner"):
        task(runner=run)


def test_runner_that_is_a_plain_class_is_rejected():
    class NotARunner:
        def start_attempt(self, attempt):
            pass

    with pytest.raises(TypeError, match="runner must be a BaseTaskRun subclass"):
        task(runner=NotARunner)


def test_unknown_option_is_named():
    with pytest.raises(TypeError) as info:
        task(retires=3)
    assert "retires" in str(info.value)
    with pytest.raises(TypeError) as info:
        task(retries=1, colour="red", shape="square")
    assert "colour" in str(info.value) and "shape" in str(info.value)


@pytest.mark.parametrize("target", [5, "plain", None, [plain]])
def test_non_callable_target_is_rejected(target):
    with pytest.raises(TypeError) as info:
        task(retries=1)(target)
    assert repr(target) in str(info.value)


def test_non_callable_target_bare_form():
    with pytest.raises(TypeError, match="needs a function"):
        task(42)


def test_runner_passed_as_the_target_is_rejected():
    # @task(ThreadTaskRun) is a mistake for @task(runner=ThreadTaskRun)
    with pytest.raises(TypeError, match="needs a function"):
        task(ThreadTaskRun)


def test_function_plus_options_positional_is_rejected():
    with pytest.raises(TypeError):
        task(plain, retries=2)


def test_good_edge_values_are_accepted():
    t = task(retries=0, retry_sleep_time=0, backoff=1, jitter=0, timeout=0.001, key=lambda *a, **k: "k",
             retry_on=(OSError,), runner=ThreadTaskRun.configure(max_workers=2))(plain)
    assert t.timeout == 0.001
    assert issubclass(t.runner, ThreadTaskRun)
    assert callable(t.key)


def test_task_and_errors_are_exported():
    assert taskrun.task is task
    assert taskrun.TaskRun is BaseTaskRun
    for name in ("TaskrunError", "TaskStopped", "TaskTimeout", "TaskStillRunning", "WorkerDied",
                 "SerializationError", "UpstreamFailed", "LedgerError"):
        cls = getattr(taskrun, name)
        assert cls is getattr(taskrun.errors, name)
        assert issubclass(cls, taskrun.TaskrunError)


def test_a_task_pickles_as_its_function_and_options(tmp_path):
    """A task referred to by another task's function travels to workers: rebuilt, not copied."""
    import pickle

    import cloudpickle

    from taskrun import Ledger, MultiprocessTaskRun

    runner = MultiprocessTaskRun.configure(max_workers=3, start_method="spawn")
    original = task(runner=runner, retries=2, timeout=5.0, ledger=Ledger(tmp_path / "runs.db"), name="named")(
        lambda x: x * 2
    )
    copy = pickle.loads(cloudpickle.dumps(original))
    assert copy is not original
    assert copy.fn(21) == 42
    assert (copy.name, copy.retries, copy.timeout) == ("named", 2, 5.0)
    assert copy.runner is runner  # configure() with the same settings gives the same class
    assert copy.ledger == original.ledger
    assert copy.ledger.path == str(tmp_path / "runs.db")


@task(runner=SequentialTaskRun)
def module_level_double(x):
    return 2 * x


def test_a_module_level_task_pickles_by_reference_with_the_standard_pickle():
    import pickle

    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        assert pickle.loads(pickle.dumps(module_level_double, protocol)) is module_level_double


def test_an_async_generator_function_is_refused_with_the_fix():
    async def fetch(url):
        yield url

    with pytest.raises(TypeError, match=r"fetch.*async generator function.*async def that collects"):
        task(fetch)
    with pytest.raises(TypeError, match=r"async generator function"):
        task(runner=ThreadTaskRun)(fetch)


def test_configure_with_no_settings_is_the_runner_itself():
    assert ThreadTaskRun.configure() is ThreadTaskRun
    configured = ThreadTaskRun.configure(max_workers=2)
    assert configured.configure() is configured


def test_a_task_used_as_a_method_gets_its_instance():
    class Counter:
        def __init__(self, start):
            self.start = start

        @task(runner=SequentialTaskRun)
        def plus(self, n):
            return self.start + n

    assert Counter(40).plus(2).get_result() == 42
    assert Counter.plus.name.endswith("Counter.plus")
