//! vsha-agent
