"""runtimed SDK: what users import. Mirrors Modal's API: change the import line and go."""
from .app import App, enter, method
from .exception import (AuthError, ContainerCrashError, Error, ExecutionError,
                        FunctionTimeoutError, ImageBuildError, InvalidError, NotFoundError,
                        OOMError, RemoteError, SnapshotError, TimeoutError)
from .functions import Function, FunctionCall
from .image import Image

__all__ = ["App", "Image", "Function", "FunctionCall", "enter", "method", "Error",
           "InvalidError", "AuthError", "NotFoundError", "ImageBuildError", "ExecutionError",
           "OOMError", "FunctionTimeoutError", "ContainerCrashError", "RemoteError",
           "SnapshotError", "TimeoutError"]
