mod mock;
mod mock_selftest;
mod support;

mod commands;
mod documents;
mod errors;
mod incremental;
mod providers;
mod resume;
mod secrets;
