"""One module per stage; each is a pure function of (configs, inputs on disk) -> outputs on disk."""
