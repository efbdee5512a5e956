//! chatq's shared library: configuration, domain types, the PostgreSQL
//! repository, the RabbitMQ topology and publisher, and telemetry setup.

pub mod config;
pub mod db;
pub mod domain;
pub mod group;
pub mod metrics;
pub mod queue;
pub mod sync;
pub mod telemetry;
pub mod time;

/// The schema migrations, embedded at compile time. Applying them takes a
/// PostgreSQL advisory lock, so several replicas may start at once.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
