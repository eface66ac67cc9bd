#!/bin/sh
# Prints a greeting. No network, no files: the sandbox would refuse anything else anyway.
echo "Hello, ${1:-there}, from a signed Chitin skill."
