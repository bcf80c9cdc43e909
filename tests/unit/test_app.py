"""sdk.app / sdk.functions without a runtime: options, decorator errors, .local()."""
from __future__ import annotations

import pytest

from sdk import App, Image, InvalidError, enter, method
from sdk.exception import ImageBuildError, OOMError, from_wire


def test_function_options_become_config():
    app = App("t")

    @app.function(cpu=1, memory=512, timeout=60, retries=1, env={"A": "1"})
    def square(x):
        return x * x

    cfg = square.config
    assert (cfg["cpu"], cfg["memory"], cfg["timeout"], cfg["retries"]) == (1, 512, 60.0, 1)
    assert cfg["env"] == {"A": "1"}
    assert app.registered_functions == {"test_function_options_become_config.<locals>.square":
                                        square}
    assert square.local(3) == 9 and square(4) == 16
    assert square.__wrapped__(5) == 25


def test_defaults_and_aliases():
    app = App("t")

    @app.function(keep_warm=2, container_idle_timeout=5, cpu=(0.5, 2.0), memory=(128, 256))
    def f():
        return 1

    cfg = f.config
    assert cfg["min_containers"] == 2 and cfg["scaledown_window"] == 5
    assert cfg["cpu"] == 0.5 and cfg["cpu_limit"] == 2.0 and cfg["memory"] == 256

    @app.function
    def g():
        return 2

    assert g.config["memory"] == 128 and g.config["timeout"] == 300 and g.config["retries"] == 0
    assert g.image.keys() == Image.debian_slim().keys()


@pytest.mark.parametrize("opts", [{"cpu": 0}, {"cpu": -1}, {"memory": 8}, {"timeout": 0},
                                  {"retries": 11}, {"retries": -1}, {"min_containers": -1}])
def test_bad_options(opts):
    app = App("t")
    with pytest.raises(InvalidError):
        app.function(**opts)


@pytest.mark.parametrize("opts", [{"gpu": "A10G", "priority": "high"},
                                  {"gpu": "A10G", "priority": 1.5},
                                  {"gpu": "A10G", "priority": True},
                                  {"gpu": "A10G", "priority": 10_000},
                                  {"priority": 5}])          # priority orders GPU calls only
def test_bad_priority(opts):
    with pytest.raises(InvalidError, match="priority"):
        App("t").function(**opts)


def test_priority_option():
    app = App("t")

    @app.function(gpu="A10G", priority=10)
    def hi(x):
        return x

    @app.function(gpu="A10G")
    def lo(x):
        return x

    assert hi.config["priority"] == 10
    assert "priority" not in lo.config      # the default leaves function ids as they were

    @app.cls(gpu="A10G", priority=-5)
    class Batch:
        @method()
        def go(self):
            return 1

    assert Batch.go.config["priority"] == -5


def test_decorator_misuse():
    app = App("t")
    with pytest.raises(InvalidError):
        app.function(app.function(lambda: 1))
    with pytest.raises(InvalidError):
        @app.function
        class C:
            pass


def test_remote_before_deploy_says_how():
    app = App("t")

    @app.function
    def f():
        return 1

    with pytest.raises(InvalidError, match="app.run"):
        f.remote()
    with pytest.raises(InvalidError, match="app.run"):
        f.spawn()


def test_cls_local_runs_enter_hooks():
    app = App("t")

    @app.cls(cpu=1)
    class Model:
        @enter()
        def load(self):
            self.w = 3

        @method()
        def predict(self, x):
            return self.w * x

    assert Model().predict.local(2) == 6
    assert any(k.endswith("Model.predict") for k in app.registered_functions)
    with pytest.raises(InvalidError):
        app.cls(bogus=1)
    with pytest.raises(InvalidError):
        @app.cls
        class NoMethods:
            pass


def test_errors_round_trip_through_the_wire():
    e = ImageBuildError("step failed", step="run_commands x", exit_code=3, log_tail="oops")
    back = from_wire(e.to_wire())
    assert type(back) is ImageBuildError
    assert (back.step, back.exit_code, back.log_tail) == ("run_commands x", 3, "oops")
    assert "oops" in str(back)
    assert type(from_wire(OOMError("m").to_wire())) is OOMError
    assert type(from_wire({"code": "something-new", "message": "m"})).__name__ == "Error"
