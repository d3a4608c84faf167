"""In-process twins of every port: the embedded default, and fast domain tests."""
