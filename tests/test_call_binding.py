"""A call and its arguments: the task's options win over the function's attributes, a parameter
may be named ``self``, and arguments that do not fit the signature raise TypeError at the call."""

from __future__ import annotations

import functools
import threading

import pytest

from taskrun import SequentialTaskRun, Status, ThreadTaskRun, task

Threads = ThreadTaskRun.configure(max_workers=2)
WAIT = 10


# ---- the task's options win over the function's own attributes ---------------------------------


def test_the_functions_attributes_do_not_overwrite_the_tasks_options() -> None:
    def fetch(url: str) -> str:
        """Fetch a page."""
        return url.upper()

    fetch.runner = "x"  # type: ignore[attr-defined]
    fetch.retries = "many"  # type: ignore[attr-defined]
    fetch.timeout = -1  # type: ignore[attr-defined]
    fetch.name = 5  # type: ignore[attr-defined]
    fetch.fn = None  # type: ignore[attr-defined]
    fetch.map = None  # type: ignore[attr-defined]
    fetch._arity = None  # type: ignore[attr-defined]
    fetch.label = "mine"  # type: ignore[attr-defined]

    t = task(runner=SequentialTaskRun, retries=1)(fetch)
    assert t.runner is SequentialTaskRun and t.retries == 1 and t.timeout is None
    assert t.name == fetch.__qualname__ and t.fn is fetch
    assert t("a").get_result() == "A"
    assert t.map(["b"]).results() == ["B"]
    # What functools.wraps brings still comes along, and so do the function's other attributes.
    assert t.__name__ == "fetch" and t.__doc__ == "Fetch a page." and t.__wrapped__ is fetch
    assert t.__module__ == fetch.__module__ and t.__qualname__ == fetch.__qualname__
    assert t.label == "mine"  # type: ignore[attr-defined]


def test_a_bare_task_keeps_its_defaults_over_the_functions_attributes() -> None:
    def work() -> int:
        return 1

    work.retries = 7  # type: ignore[attr-defined]
    work.runner = SequentialTaskRun  # type: ignore[attr-defined]
    t = task(work)
    assert t.retries == 0 and t.runner is not SequentialTaskRun


# ---- a parameter named self ----------------------------------------------------------------------


def test_a_parameter_named_self_can_be_passed_by_keyword() -> None:
    @task(runner=SequentialTaskRun)
    def greet(self: str, punctuation: str = "!") -> str:
        return self + punctuation

    assert greet(self="hi").get_result() == "hi!"
    assert greet("hi", punctuation="?").get_result() == "hi?"


def test_a_task_used_as_a_method() -> None:
    class Counter:
        def __init__(self, start: int) -> None:
            self.start = start

        @task(runner=SequentialTaskRun)
        def add(self, x: int) -> int:
            return self.start + x

    counter = Counter(10)
    assert counter.add(1).get_result() == 11
    assert counter.add(x=2).get_result() == 12
    assert Counter.add(self=counter, x=3).get_result() == 13  # the class's attribute is the task itself
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3 were given"):
        counter.add(1, 2)


# ---- wrong arguments fail at the call --------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda inc: inc(1, 2), r"inc\(\) takes 1 positional argument but 2 were given"),
        (lambda inc: inc(y=1), r"inc\(\) got an unexpected keyword argument 'y'"),
        (lambda inc: inc(), r"inc\(\) missing 1 required positional argument: 'x'"),
        (lambda inc: inc(1, x=1), r"inc\(\) got multiple values for argument 'x'"),
    ],
    ids=["too-many", "unknown-keyword", "missing", "twice"],
)
@pytest.mark.parametrize("runner", [Threads, SequentialTaskRun], ids=["threads", "sequential"])
def test_arguments_that_do_not_fit_raise_at_the_call_and_nothing_runs(call, message: str, runner: type) -> None:
    calls: list[object] = []

    @task(runner=runner, retries=3, name="inc")
    def inc(x: int) -> int:
        calls.append(x)
        return x + 1

    with pytest.raises(TypeError, match=message) as caught:
        call(inc)
    assert caught.value.__traceback__ is not None
    assert inc(1).get_result(timeout=WAIT) == 2  # the task still works
    assert calls == [1]  # nothing of the bad calls ran (nor was retried)


def test_every_kind_of_parameter_is_checked() -> None:
    @task(runner=SequentialTaskRun, name="f")
    def f(a, b=2, /, c=3, *rest, d, e=5, **extra):
        return (a, b, c, rest, d, e, extra)

    assert f(1, d=4).get_result() == (1, 2, 3, (), 4, 5, {})
    assert f(1, 2, 3, 4, 5, d=6, z=7).get_result() == (1, 2, 3, (4, 5), 6, 5, {"z": 7})
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'd'"):
        f(1)
    assert f(1, a=0, d=4).get_result()[-1] == {"a": 0}  # a positional-only name is free for **extra
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
        f(d=4)

    @task(runner=SequentialTaskRun, name="g")
    def g(a, /):
        return a

    with pytest.raises(TypeError, match=r"g\(\) got some positional-only arguments passed as keyword arguments: 'a'"):
        g(a=1)


def test_functions_without_a_readable_signature_are_not_checked() -> None:
    ident = task(runner=SequentialTaskRun)(functools.partial(max, 0))
    assert ident(3).get_result() == 3
    assert ident(-1, -2).get_result() == 0


def test_a_decorated_function_is_checked_against_its_wrapper() -> None:
    """``(*args, **kwargs)`` of the wrapper accepts anything: the wrapper, not the task, decides."""

    def adds_a_keyword(fn):
        @functools.wraps(fn)
        def wrapper(*args, scale=1, **kwargs):
            return fn(*args, **kwargs) * scale

        return wrapper

    @task(runner=SequentialTaskRun)
    @adds_a_keyword
    def double(x: int) -> int:
        return 2 * x

    assert double(3, scale=10).get_result() == 60


def test_a_custom_signature_with_names_no_def_could_have_is_checked_too() -> None:
    import inspect

    def fn(*args: object, **kwargs: object) -> tuple[object, ...]:
        return args

    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("class", inspect.Parameter.POSITIONAL_ONLY)]
    )
    t = task(runner=SequentialTaskRun, name="odd")(fn)
    assert t(1).get_result() == (1,)
    with pytest.raises(TypeError, match=r"odd\(\): too many positional arguments"):
        t(1, 2)


def test_the_check_is_made_once_per_task_and_is_thread_safe() -> None:
    @task(runner=Threads)
    def ident(x: int) -> int:
        return x

    barrier = threading.Barrier(4, timeout=WAIT)
    runs = []

    def first_calls() -> None:
        barrier.wait()
        runs.extend(ident(i) for i in range(50))

    threads = [threading.Thread(target=first_calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(runs) == 200 and all(run.get_result(timeout=WAIT) in range(50) for run in runs)
    checker = ident._checker
    ident(1).get_result(timeout=WAIT)
    ident(x=1).get_result(timeout=WAIT)
    assert ident._checker is checker


# ---- map and starmap ---------------------------------------------------------------------------------


def test_map_of_a_function_that_cannot_take_one_argument_raises_at_the_call() -> None:
    @task(runner=Threads, name="add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"add.map\(\) passes each item as the one argument, and add\(\) missing 1"):
        add.map([1, 2])
    assert add.starmap([(1, 2)]).results(timeout=WAIT) == [3]


def test_a_starmap_item_that_does_not_fit_fails_alone_and_is_not_retried() -> None:
    calls: list[tuple[int, ...]] = []

    @task(runner=Threads, retries=3, name="add")
    def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    group = add.starmap([(1, 2), (1, 2, 3), (3,), (4, 5)])
    assert group.wait(timeout=WAIT)
    assert [run.status for run in group] == [Status.SUCCEEDED, Status.FAILED, Status.FAILED, Status.SUCCEEDED]
    assert [run.attempts for run in group] == [1, 0, 0, 1]
    assert "takes 2 positional arguments but 3 were given" in str(group[1].exception())
    assert "missing 1 required positional argument: 'y'" in str(group[2].exception())
    assert sorted(calls) == [(1, 2), (4, 5)]
    assert group.results(raise_exceptions=False)[::3] == [3, 9]
