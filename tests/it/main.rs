mod mock;
mod mock_selftest;

mod incremental;
mod support;
