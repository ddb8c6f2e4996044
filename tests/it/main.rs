mod faults_support;
mod graph;
mod mock;
mod mock_selftest;
mod support;

mod build;
mod commands;
mod documents;
mod errors;
mod incremental;
mod providers;
mod replies;
mod resume;
mod secrets;
