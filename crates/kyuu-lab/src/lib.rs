//! kyuu-lab
