//! kegline: pipelines that turn documents into fine-tuning datasets, with every LLM call
//! cached under a content hash so that re-runs pay only for what changed.

pub mod cache;
pub mod chunker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dag;
pub mod provider;
pub mod record;
pub mod repair;
pub mod report;
pub mod runner;
pub mod stage;
pub mod template;
