#!/bin/sh
# `pip check` for the image build. dask-cuda is installed without its rapids-dask-dependency
# pin (see infra/Dockerfile), so that one line is expected in the CUDA variant; anything else
# fails the build.
set -eu
out=$(pip check 2>&1 || true)
rest=$(printf '%s\n' "$out" | grep -v -e '^No broken requirements found\.$' -e 'requires rapids-dask-dependency, which is not installed\.$' || true)
if [ -n "$rest" ]; then
    printf 'pip check found broken requirements:\n%s\n' "$rest" >&2
    exit 1
fi
printf '%s\n' "$out"
