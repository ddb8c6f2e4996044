mod mock;
mod mock_selftest;

mod commands;
mod documents;
mod errors;
mod incremental;
mod resume;
mod secrets;
mod support;
