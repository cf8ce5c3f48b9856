//! kyuu-client
