"""A tiny OpenCL host (ctypes over the ICD loader, libOpenCL.so) to run TVM's generated kernels on a CPU OpenCL
implementation (PoCL): the TVM wheel has no OpenCL runtime, so `mobile-gpu` launches the kernels itself.

Only what that needs: list devices, build a program from source, make buffers, set arguments, launch, read back.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import numpy as np

CL_DEVICE_TYPE_ALL = 0xFFFFFFFF
CL_PLATFORM_NAME = 0x0902
CL_DEVICE_NAME = 0x102B
CL_PROGRAM_BUILD_LOG = 0x1183
CL_MEM_READ_WRITE = 1 << 0
CL_MEM_COPY_HOST_PTR = 1 << 5

_p = ctypes.c_void_p
_size = ctypes.c_size_t
_uint = ctypes.c_uint32
_int = ctypes.c_int32


class OpenCLError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    name = ctypes.util.find_library("OpenCL")
    if not name:
        raise OpenCLError("libOpenCL not found (apt-get install ocl-icd-libopencl1 pocl-opencl-icd)")
    lib = ctypes.CDLL(name)
    sig = {
        "clGetPlatformIDs": (_int, [_uint, ctypes.POINTER(_p), ctypes.POINTER(_uint)]),
        "clGetPlatformInfo": (_int, [_p, _uint, _size, _p, ctypes.POINTER(_size)]),
        "clGetDeviceIDs": (_int, [_p, ctypes.c_uint64, _uint, ctypes.POINTER(_p), ctypes.POINTER(_uint)]),
        "clGetDeviceInfo": (_int, [_p, _uint, _size, _p, ctypes.POINTER(_size)]),
        "clCreateContext": (_p, [_p, _uint, ctypes.POINTER(_p), _p, _p, ctypes.POINTER(_int)]),
        "clCreateCommandQueue": (_p, [_p, _p, ctypes.c_uint64, ctypes.POINTER(_int)]),
        "clCreateProgramWithSource": (_p, [_p, _uint, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(_size),
                                           ctypes.POINTER(_int)]),
        "clBuildProgram": (_int, [_p, _uint, ctypes.POINTER(_p), ctypes.c_char_p, _p, _p]),
        "clGetProgramBuildInfo": (_int, [_p, _p, _uint, _size, _p, ctypes.POINTER(_size)]),
        "clCreateKernel": (_p, [_p, ctypes.c_char_p, ctypes.POINTER(_int)]),
        "clCreateBuffer": (_p, [_p, ctypes.c_uint64, _size, _p, ctypes.POINTER(_int)]),
        "clSetKernelArg": (_int, [_p, _uint, _size, _p]),
        "clEnqueueNDRangeKernel": (_int, [_p, _p, _uint, ctypes.POINTER(_size), ctypes.POINTER(_size),
                                          ctypes.POINTER(_size), _uint, _p, _p]),
        "clEnqueueReadBuffer": (_int, [_p, _p, _uint, _size, _size, _p, _uint, _p, _p]),
        "clEnqueueWriteBuffer": (_int, [_p, _p, _uint, _size, _size, _p, _uint, _p, _p]),
        "clFinish": (_int, [_p]),
        "clReleaseMemObject": (_int, [_p]),
        "clReleaseKernel": (_int, [_p]),
        "clReleaseProgram": (_int, [_p]),
        "clReleaseCommandQueue": (_int, [_p]),
        "clReleaseContext": (_int, [_p]),
    }
    for fn, (res, args) in sig.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise OpenCLError(f"{what} failed with OpenCL error {code}")


def _info(getter, handle, param: int) -> str:
    size = _size()
    _check(getter(handle, param, 0, None, ctypes.byref(size)), "clGet*Info")
    buf = ctypes.create_string_buffer(size.value)
    _check(getter(handle, param, size.value, buf, None), "clGet*Info")
    return buf.value.decode(errors="replace")


def _platforms() -> list:
    lib = library()
    n = _uint()
    if lib.clGetPlatformIDs(0, None, ctypes.byref(n)) != 0 or n.value == 0:
        return []
    ids = (_p * n.value)()
    _check(lib.clGetPlatformIDs(n.value, ids, None), "clGetPlatformIDs")
    return list(ids)


def _devices(platform) -> list:
    lib = library()
    n = _uint()
    if lib.clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 0, None, ctypes.byref(n)) != 0 or n.value == 0:
        return []
    ids = (_p * n.value)()
    _check(lib.clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, n.value, ids, None), "clGetDeviceIDs")
    return list(ids)


def list_devices() -> list[str]:
    lib = library()
    return [f"{_info(lib.clGetPlatformInfo, p, CL_PLATFORM_NAME)}: {_info(lib.clGetDeviceInfo, d, CL_DEVICE_NAME)}"
            for p in _platforms() for d in _devices(p)]


class Session:
    """One context and in-order queue on the first device (of the platform whose name contains `prefer`)."""

    def __init__(self, prefer: str = "Portable Computing Language"):
        lib = self.lib = library()
        choices = [(p, d) for p in _platforms() for d in _devices(p)]
        if not choices:
            raise OpenCLError("no OpenCL device found (apt-get install pocl-opencl-icd)")
        choices.sort(key=lambda pd: prefer not in _info(lib.clGetPlatformInfo, pd[0], CL_PLATFORM_NAME))
        self.platform, self.device = choices[0]
        self.device_name = (f"{_info(lib.clGetPlatformInfo, self.platform, CL_PLATFORM_NAME)}: "
                            f"{_info(lib.clGetDeviceInfo, self.device, CL_DEVICE_NAME)}")
        err = _int()
        dev = (_p * 1)(self.device)
        self.ctx = lib.clCreateContext(None, 1, dev, None, None, ctypes.byref(err))
        _check(err.value, "clCreateContext")
        self.queue = lib.clCreateCommandQueue(self.ctx, self.device, 0, ctypes.byref(err))
        _check(err.value, "clCreateCommandQueue")
        self._objects: list[tuple[str, int]] = []

    def program(self, source: str) -> int:
        lib = self.lib
        err = _int()
        src = ctypes.c_char_p(source.encode())
        prog = lib.clCreateProgramWithSource(self.ctx, 1, ctypes.byref(src), None, ctypes.byref(err))
        _check(err.value, "clCreateProgramWithSource")
        self._objects.append(("clReleaseProgram", prog))
        dev = (_p * 1)(self.device)
        if lib.clBuildProgram(prog, 1, dev, b"", None, None) != 0:
            log = _info(lambda h, p, s, v, r: lib.clGetProgramBuildInfo(h, self.device, p, s, v, r), prog,
                        CL_PROGRAM_BUILD_LOG)
            raise OpenCLError(f"the OpenCL compiler rejected TVM's kernels: {log.strip()[:500]}")
        return prog

    def kernel(self, program: int, name: str) -> int:
        err = _int()
        k = self.lib.clCreateKernel(program, name.encode(), ctypes.byref(err))
        _check(err.value, f"clCreateKernel({name})")
        self._objects.append(("clReleaseKernel", k))
        return k

    def buffer(self, nbytes: int, data: np.ndarray | None = None) -> int:
        err = _int()
        flags = CL_MEM_READ_WRITE
        host = None
        if data is not None:
            data = np.ascontiguousarray(data)
            flags |= CL_MEM_COPY_HOST_PTR
            host = data.ctypes.data_as(_p)
        buf = self.lib.clCreateBuffer(self.ctx, flags, max(nbytes, 4), host, ctypes.byref(err))
        _check(err.value, "clCreateBuffer")
        self._objects.append(("clReleaseMemObject", buf))
        return buf

    def write(self, buf: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        _check(self.lib.clEnqueueWriteBuffer(self.queue, buf, 1, 0, data.nbytes, data.ctypes.data_as(_p), 0, None,
                                             None), "clEnqueueWriteBuffer")

    def read(self, buf: int, nbytes: int, offset: int = 0) -> bytes:
        out = ctypes.create_string_buffer(nbytes)
        _check(self.lib.clEnqueueReadBuffer(self.queue, buf, 1, offset, nbytes, out, 0, None, None),
               "clEnqueueReadBuffer")
        return out.raw

    def launch(self, kernel: int, args: list, global_size: list[int], local_size: list[int]) -> None:
        """Set `args` (cl_mem handles as ints wrapped in ('mem', h), or ctypes scalars) and enqueue."""
        lib = self.lib
        for i, arg in enumerate(args):
            if isinstance(arg, tuple) and arg[0] == "mem":
                h = _p(arg[1])
                _check(lib.clSetKernelArg(kernel, i, ctypes.sizeof(_p), ctypes.byref(h)), f"clSetKernelArg({i})")
            else:
                _check(lib.clSetKernelArg(kernel, i, ctypes.sizeof(arg), ctypes.byref(arg)), f"clSetKernelArg({i})")
        dims = len(global_size)
        g = (_size * dims)(*global_size)
        loc = (_size * dims)(*local_size)
        _check(lib.clEnqueueNDRangeKernel(self.queue, kernel, dims, None, g, loc, 0, None, None),
               "clEnqueueNDRangeKernel")

    def finish(self) -> None:
        _check(self.lib.clFinish(self.queue), "clFinish")

    def close(self) -> None:
        for fn, h in reversed(self._objects):
            getattr(self.lib, fn)(h)
        self._objects.clear()
        self.lib.clReleaseCommandQueue(self.queue)
        self.lib.clReleaseContext(self.ctx)
