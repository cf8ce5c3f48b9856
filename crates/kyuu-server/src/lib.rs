//! kyuu-server

pub mod relay;
