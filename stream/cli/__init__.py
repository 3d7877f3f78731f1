"""The `memstream` command line: the parser (`main`) and the commands that are not a subsystem's own."""
