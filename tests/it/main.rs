mod mock;
mod mock_selftest;

mod incremental;
mod providers;
mod support;
