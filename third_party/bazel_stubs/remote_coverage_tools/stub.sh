#!/bin/sh
echo "coverage is not available in an offline build" >&2
exit 1
