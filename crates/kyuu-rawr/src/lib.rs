//! kyuu-rawr
