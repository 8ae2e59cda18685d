"""Build of the EMS C core and its Cython bindings (`pip install .`)."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_SOURCES = ["arena.c", "slab.c", "index.c", "pool.c", "pool_read.c", "pool_write.c",
                "spill_ring.c", "crc32c.c", "frame.c", "sha256.c", "auth.c", "netio.c",
                "directory.c", "latency.c", "server.c", "server_ops.c", "server_miss.c",
                "client.c"]

# The core is C11 and must build without warnings; EMS_DEBUG=1 adds assertions and -O0.
c_flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O3", "-fno-strict-aliasing"]
if os.environ.get("EMS_DEBUG") == "1":
    c_flags = [f for f in c_flags if f != "-O3"] + ["-O0", "-g"]

# The C files are compiled into a static library so -Werror applies to the core only;
# Cython's generated C is compiled with the default flags.
core_library = ("ems_core", {
    "sources": [os.path.join("csrc", name) for name in CORE_SOURCES],
    "include_dirs": ["csrc"],
    "cflags": c_flags + ["-fPIC"],
})

extensions = [
    Extension(
        "ems._core",
        sources=["ems/_core.pyx"],
        include_dirs=["csrc"],
        extra_compile_args=["-O2"],
        extra_link_args=["-pthread"],
    )
]

setup(
    libraries=[core_library],
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"embedsignature": True}),
)
