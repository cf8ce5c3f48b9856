//! kyuu-server
