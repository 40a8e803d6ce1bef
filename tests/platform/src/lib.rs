//! The reference Tether platform (in progress).
