//! The process's allocator: mimalloc, told to keep the memory it frees. A training step
//! frees and allocates the same few hundred MiB of activations and gradients every step;
//! kept, they are reused without new page faults, which made flex training steps faster
//! than on glibc's allocator (docs/performance.md). The cost: the process keeps its peak
//! memory, as a caching allocator does.

use libmimalloc_sys::{mi_option_set, mi_option_t};
use mimalloc::MiMalloc;

#[global_allocator]
static ALLOCATOR: MiMalloc = MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its position in `mi_option_t` (mimalloc.h), for
/// which the sys crate names no constant. The delay is in milliseconds; -1 never purges.
const PURGE_DELAY: mi_option_t = 15;

/// Makes mimalloc keep freed memory for reuse instead of returning it to the OS.
pub fn keep_freed_memory() {
    // SAFETY: mimalloc's options may be set at any time, from any thread.
    unsafe { mi_option_set(PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use libmimalloc_sys::mi_option_get;

    /// mimalloc's current purge delay (milliseconds; -1: never).
    fn purge_delay() -> i64 {
        // SAFETY: reading an option is always valid.
        // `c_long` is 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        let delay = i64::from(unsafe { mi_option_get(PURGE_DELAY) });
        delay
    }

    #[test]
    fn purge_delay_option_is_the_one_set() {
        // mimalloc's default purge delay is 1000 ms: reading it checks that `PURGE_DELAY`
        // names that option and not another one.
        assert_eq!(
            purge_delay(),
            1000,
            "PURGE_DELAY is not mimalloc's purge delay"
        );
        keep_freed_memory();
        assert_eq!(purge_delay(), -1);
    }
}
