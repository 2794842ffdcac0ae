//! The time-slice ladder: which slice of absolute time a record waits in, when each slice is swept,
//! and which topic holds it.
//!
//! Level `i` cuts time into windows of width `w_i = w_0 * r^i`, aligned to the epoch, so every
//! instance computes the same windows with no coordination. Window `n` of level `i` covers
//! `[n*w_i, (n+1)*w_i)` and is swept at `n*w_i - f*w_i/r`: early enough that everything in it can
//! be moved to a finer level before the finer window's own sweep. A record is put in the finest
//! swept level whose ring of slot topics can hold its window (see [`Ladder::route`]): each sweep
//! moves it at least one level down, often several, so it makes at most one hop per level and
//! usually fewer. What no window can take any more is imminent and goes to the in-memory timer.

use std::fmt;

/// One window of one level: the unit a sweep (a job) works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceId {
    pub level: usize,
    pub window: i64,
}

impl fmt::Display for SliceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}:{}", self.level, self.window)
    }
}

impl SliceId {
    /// The header form, `level:window`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.level, self.window)
    }

    pub fn decode(s: &str) -> Option<SliceId> {
        let (level, window) = s.split_once(':')?;
        Some(SliceId {
            level: level.parse().ok()?,
            window: window.parse().ok()?,
        })
    }
}

/// Where a record goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Into this window's slot topic, to be swept later.
    Slice(SliceId),
    /// Into the in-memory timer: due before any window could be swept again (or already past due).
    Timer,
}

/// Invalid ladder settings, refused at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LadderError {
    #[error("the smallest slice must be at least 10 ms (got {0} ms)")]
    SmallestTooSmall(i64),
    #[error("the ratio must be between 2 and 16 (got {0})")]
    BadRatio(i64),
    #[error("the largest slice ({largest} ms) must be at least the smallest ({smallest} ms)")]
    LargestTooSmall { smallest: i64, largest: i64 },
    #[error("the safety margin ({margin} ms) must be below the smallest slice ({lead} ms): level-1 windows are swept at least that long before they begin")]
    MarginTooLarge { margin: i64, lead: i64 },
    #[error("at most 24 levels (the widths given make {0})")]
    TooManyLevels(usize),
    #[error(
        "the sweep lead factor must be at least 1 and below the ratio ({ratio}); got {factor}"
    )]
    BadLeadFactor { factor: i64, ratio: i64 },
    #[error("at least two levels are needed (largest >= smallest * ratio): level 0 is never swept (what would go there waits in the timer), so it must not be the top level, which holds everything beyond the horizon")]
    OneLevel,
}

/// The configured levels and the pure arithmetic over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    widths: Vec<i64>,
    ratio: i64,
    margin_ms: i64,
    lead_factor: i64,
}

impl Ladder {
    /// Levels `smallest * ratio^i` up to and including the last one not above `largest`.
    /// `margin_ms` is the time a record routed to a window must have before that window's sweep
    /// starts: it covers produce latency and clock skew between instances.
    pub fn new(
        smallest: i64,
        ratio: i64,
        largest: i64,
        margin_ms: i64,
    ) -> Result<Self, LadderError> {
        if smallest < 10 {
            return Err(LadderError::SmallestTooSmall(smallest));
        }
        if !(2..=16).contains(&ratio) {
            return Err(LadderError::BadRatio(ratio));
        }
        if largest < smallest {
            return Err(LadderError::LargestTooSmall { smallest, largest });
        }
        // Level 0 is never swept, so its own lead (w_0 / r) means nothing: the finest sweep is of
        // level 1, `f * w_0` ahead, and a record must be routable to some window before it.
        if margin_ms < 0 || margin_ms >= smallest {
            return Err(LadderError::MarginTooLarge {
                margin: margin_ms,
                lead: smallest,
            });
        }
        let mut widths = vec![smallest];
        while let Some(next) = widths.last().and_then(|w| w.checked_mul(ratio)) {
            if next > largest {
                break;
            }
            widths.push(next);
            if widths.len() > 24 {
                return Err(LadderError::TooManyLevels(widths.len()));
            }
        }
        if widths.len() < 2 {
            return Err(LadderError::OneLevel);
        }
        Ok(Ladder {
            widths,
            ratio,
            margin_ms,
            lead_factor: 1,
        })
    }

    /// Sweeps each window `factor` finer widths before it begins (`factor * w_i / r`) instead of
    /// one: more time for a sweep to finish before its records fall due, at the cost of one more
    /// slot topic per level per step (see [`Ladder::slots`]). Routing stays correct for any factor.
    pub fn with_lead_factor(mut self, factor: i64) -> Result<Self, LadderError> {
        if !(1..self.ratio).contains(&factor) {
            return Err(LadderError::BadLeadFactor {
                factor,
                ratio: self.ratio,
            });
        }
        self.lead_factor = factor;
        Ok(self)
    }

    pub fn lead_factor(&self) -> i64 {
        self.lead_factor
    }

    pub fn levels(&self) -> usize {
        self.widths.len()
    }

    pub fn width(&self, level: usize) -> i64 {
        self.widths[level]
    }

    pub fn widths(&self) -> &[i64] {
        &self.widths
    }

    pub fn ratio(&self) -> i64 {
        self.ratio
    }

    pub fn margin_ms(&self) -> i64 {
        self.margin_ms
    }

    /// Slot topics per swept level: `r + 1 + f` for a lead factor `f` (`r + 2` with the original
    /// lead), so that by the time a slot is reused for a new window the window it held before
    /// has been swept.
    pub fn slots(&self) -> i64 {
        self.ratio + 1 + self.lead_factor
    }

    /// Slot topics of a level: level 0 is never swept (what would go there waits in the timer; its
    /// one topic is read only by the catch-up on assignment, for an earlier version's records);
    /// swept levels have [`Ladder::slots`].
    pub fn slots_of(&self, level: usize) -> i64 {
        if level == 0 {
            1
        } else {
            self.slots()
        }
    }

    /// How long before its window begins a window is swept: the width of the level below
    /// (`w_0 / r` for level 0).
    pub fn lead(&self, level: usize) -> i64 {
        self.widths[level] / self.ratio * self.lead_factor
    }

    /// The window of `level` that contains `t`.
    pub fn window_of(&self, level: usize, t: i64) -> i64 {
        t.div_euclid(self.widths[level])
    }

    /// `[start, end)` of a window in epoch milliseconds.
    pub fn bounds(&self, id: SliceId) -> (i64, i64) {
        let w = self.widths[id.level];
        (id.window * w, (id.window + 1) * w)
    }

    /// When the sweep of `id` starts.
    pub fn sweep_at(&self, id: SliceId) -> i64 {
        self.bounds(id).0 - self.lead(id.level)
    }

    /// The latest window of `level` whose sweep has started at `now`.
    pub fn current_window(&self, level: usize, now: i64) -> i64 {
        (now + self.lead(level)).div_euclid(self.widths[level])
    }

    /// The slot (0..slots_of(level)) that holds window `id`.
    pub fn slot(&self, id: SliceId) -> i64 {
        id.window.rem_euclid(self.slots_of(id.level))
    }

    /// The next place for a record due at `due`, routed at `now`: the finest swept level (1 and up)
    /// whose window containing `due` starts its sweep more than the margin after `now` and fits
    /// that level's ring (see [`Ladder::last_writable`]), else the timer. The top level holds
    /// everything beyond the horizon, in any window.
    ///
    /// Finest first rather than coarsest first: a record due in 70 s goes straight into a 16 s
    /// window instead of a 64 s one that is swept only to move it into the 16 s window anyway,
    /// so each record costs the broker fewer slice writes and reads. Level 0 is never swept: a
    /// record whose level-1 window has begun its sweep waits in the timer.
    pub fn route(&self, due: i64, now: i64) -> Route {
        let limit = now.saturating_add(self.margin_ms);
        let top = self.levels() - 1;
        for level in 1..self.levels() {
            let id = SliceId {
                level,
                window: self.window_of(level, due),
            };
            if self.sweep_at(id) <= limit {
                // Coarser windows containing `due` began their sweeps even earlier.
                return Route::Timer;
            }
            if level == top || id.window <= self.last_writable(level, now) {
                return Route::Slice(id);
            }
        }
        Route::Timer
    }

    /// The last window of a level below the top that may be written at `now`: the window that
    /// held its slot before it (`K = slots` windows earlier) ended at least one width, less the
    /// margin, ago, so its sweep (begun a lead before it started) has had `2*w + lead - margin`
    /// to finish before anything is written into the slot again. Coarsest-first routing gives
    /// exactly this gap; finest-first keeps it by this bound.
    pub fn last_writable(&self, level: usize, now: i64) -> i64 {
        now.saturating_add(self.margin_ms)
            .div_euclid(self.widths[level])
            + self.slots_of(level)
            - 2
    }

    /// The slot topic's name: `<prefix>_<width>MS_<slot>`. The width is in the name, so ladders with
    /// other widths (another deployment, or this one reconfigured) never share topics.
    pub fn topic(&self, prefix: &str, level: usize, slot: i64) -> String {
        format!("{prefix}_{}MS_{slot}", self.widths[level])
    }

    /// The topic a window's records are written to: its level's slot for it.
    pub fn window_topic(&self, prefix: &str, id: SliceId) -> String {
        self.topic(prefix, id.level, self.slot(id))
    }

    /// Every slot topic of the ladder, level by level, as `(level, slot, name)`.
    pub fn all_topics(&self, prefix: &str) -> Vec<(usize, i64, String)> {
        (0..self.levels())
            .flat_map(|level| (0..self.slots_of(level)).map(move |slot| (level, slot)))
            .map(|(level, slot)| (level, slot, self.topic(prefix, level, slot)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ladder() -> Ladder {
        Ladder::new(1_000, 4, 86_400_000, 100).unwrap()
    }

    #[test]
    fn widths_grow_by_the_ratio_up_to_the_largest() {
        let l = ladder();
        assert_eq!(
            l.widths(),
            &[1_000, 4_000, 16_000, 64_000, 256_000, 1_024_000, 4_096_000, 16_384_000, 65_536_000]
        );
        assert_eq!(l.slots(), 6);
        assert_eq!(l.topic("__SM_SLICE", 2, 5), "__SM_SLICE_16000MS_5");
        assert_eq!(l.all_topics("__SM_SLICE").len(), 1 + 8 * 6);
        assert_eq!(
            l.slot(SliceId {
                level: 0,
                window: 7
            }),
            0,
            "level 0 is one topic"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert_eq!(
            Ladder::new(5, 2, 100, 0),
            Err(LadderError::SmallestTooSmall(5))
        );
        assert_eq!(
            Ladder::new(1000, 1, 100_000, 0),
            Err(LadderError::BadRatio(1))
        );
        assert!(matches!(
            Ladder::new(1000, 2, 10, 0),
            Err(LadderError::LargestTooSmall { .. })
        ));
        assert!(
            Ladder::new(250, 4, 100_000, 100).is_ok(),
            "level 0 is never swept: its width need not divide by the ratio"
        );
        assert!(matches!(
            Ladder::new(1000, 4, 100_000, 1000),
            Err(LadderError::MarginTooLarge { .. })
        ));
    }

    #[test]
    fn imminent_and_past_due_records_go_to_the_timer() {
        let l = ladder();
        let now = 1_000_000_000_000;
        assert_eq!(l.route(now - 5_000, now), Route::Timer);
        assert_eq!(l.route(now, now), Route::Timer);
        assert_eq!(l.route(now + 500, now), Route::Timer);
    }

    #[test]
    fn a_record_goes_to_the_finest_ring_that_holds_it() {
        let l = ladder();
        let now = 1_000_000_000_000; // a multiple of 64 s
        let level_of = |delay| match l.route(now + delay, now) {
            Route::Slice(id) => id.level,
            Route::Timer => 0,
        };
        // Level 1 (4 s windows, 6 slots) reaches 20 s ahead; level 2 (16 s) 80 s.
        assert_eq!(level_of(5_000), 1);
        assert_eq!(level_of(19_999), 1);
        assert_eq!(level_of(20_000), 2);
        // Coarsest-first put this one into a 64 s window, swept only to move it into a 16 s one.
        assert_eq!(level_of(70_000), 2);
        assert_eq!(level_of(80_000), 3);
    }

    #[test]
    fn far_records_go_to_the_top_level() {
        let l = ladder();
        let now = 1_000_000_000_000;
        let year = 365 * 86_400_000;
        match l.route(now + year, now) {
            Route::Slice(id) => assert_eq!(id.level, l.levels() - 1),
            Route::Timer => panic!("a year ahead must wait in a slice"),
        }
    }

    #[test]
    fn slice_ids_round_trip_through_headers() {
        let id = SliceId {
            level: 3,
            window: -42,
        };
        assert_eq!(SliceId::decode(&id.encode()), Some(id));
        assert_eq!(SliceId::decode("x:1"), None);
        assert_eq!(SliceId::decode("3"), None);
    }

    fn arb_ladder() -> impl Strategy<Value = Ladder> {
        (
            1i64..=8,
            prop_oneof![Just(2i64), Just(4), Just(8)],
            0u32..=6,
            1i64..=7,
        )
            .prop_filter_map("valid ladder", |(base, ratio, extra, factor)| {
                let smallest = base * ratio * 10;
                let largest = smallest * ratio.pow(extra + 1);
                Ladder::new(smallest, ratio, largest, smallest / ratio / 2)
                    .ok()?
                    .with_lead_factor(factor.min(ratio - 1))
                    .ok()
            })
    }

    proptest! {
        /// Following the routes from ingest, sweep by sweep, a record reaches the timer no later
        /// than its due time minus nothing (never early), in at most one hop per level.
        #[test]
        fn records_walk_down_the_ladder_and_reach_the_timer_before_due(
            ladder in arb_ladder(),
            now in 0i64..4_000_000_000_000,
            delay in 0i64..10_000_000,
        ) {
            let due = now + delay;
            let mut t = now;
            let mut hops = 0;
            let mut last_level = usize::MAX;
            loop {
                match ladder.route(due, t) {
                    Route::Timer => break,
                    Route::Slice(id) => {
                        // The window really contains the due time ...
                        let (start, end) = ladder.bounds(id);
                        prop_assert!(start <= due && due < end);
                        // ... its sweep is in the future ...
                        prop_assert!(ladder.sweep_at(id) > t);
                        // ... and each hop goes strictly finer.
                        prop_assert!(id.level < last_level);
                        last_level = id.level;
                        hops += 1;
                        prop_assert!(hops <= ladder.levels());
                        // The next routing happens when the window is swept.
                        t = ladder.sweep_at(id);
                    }
                }
            }
            // It reaches the timer no later than the first moment the timer could need it.
            prop_assert!(t <= due.max(now));
        }

        /// Every instant belongs to exactly one window per level, and windows tile time.
        #[test]
        fn windows_tile_time(ladder in arb_ladder(), t in -4_000_000_000_000i64..4_000_000_000_000) {
            for level in 0..ladder.levels() {
                let n = ladder.window_of(level, t);
                let (start, end) = ladder.bounds(SliceId { level, window: n });
                prop_assert!(start <= t && t < end);
                prop_assert_eq!(end - start, ladder.width(level));
                let (next_start, _) = ladder.bounds(SliceId { level, window: n + 1 });
                prop_assert_eq!(next_start, end);
            }
        }

        /// The current window's sweep has started and the next one's has not.
        #[test]
        fn current_window_is_the_last_started_sweep(ladder in arb_ladder(), now in 0i64..4_000_000_000_000) {
            for level in 0..ladder.levels() {
                let n = ladder.current_window(level, now);
                let this = SliceId { level, window: n };
                let following = SliceId { level, window: n + 1 };
                prop_assert!(ladder.sweep_at(this) <= now);
                prop_assert!(ladder.sweep_at(following) > now);
            }
        }

        /// A slot is not reused while its previous window could still receive records: any window
        /// that can be written at `now` is less than `slots` windows after the current one, and the
        /// window that held its slot before began its sweep at least `2*w + lead - margin` ago.
        #[test]
        fn slots_are_not_reused_while_writable(
            ladder in arb_ladder(),
            now in 0i64..4_000_000_000_000,
            delay in 0i64..100_000_000,
        ) {
            if let Route::Slice(id) = ladder.route(now + delay, now) {
                if id.level + 1 < ladder.levels() {
                    let current = ladder.current_window(id.level, now);
                    prop_assert!(id.window > current);
                    prop_assert!(id.window - current < ladder.slots());
                    let before = SliceId { level: id.level, window: id.window - ladder.slots() };
                    let (w, lead) = (ladder.width(id.level), ladder.lead(id.level));
                    prop_assert!(ladder.sweep_at(before) + 2 * w + lead - ladder.margin_ms() <= now);
                }
            }
        }

        /// The route is the finest level that can take the record: no finer swept level has a
        /// window for it that is both unswept and writable.
        #[test]
        fn records_go_to_the_finest_level_that_can_hold_them(
            ladder in arb_ladder(),
            now in 0i64..4_000_000_000_000,
            delay in -10_000i64..100_000_000,
        ) {
            let due = now + delay;
            let chosen = match ladder.route(due, now) {
                Route::Slice(id) => id.level,
                Route::Timer => 1,
            };
            for level in 1..chosen {
                let id = SliceId { level, window: ladder.window_of(level, due) };
                let open = ladder.sweep_at(id) > now + ladder.margin_ms();
                prop_assert!(!(open && id.window <= ladder.last_writable(level, now)));
            }
        }

        /// Finest-first never costs more slice writes than coarsest-first, the rule it replaced,
        /// and both hand the record to the timer at the same moment at the latest.
        #[test]
        fn finest_first_makes_no_more_hops_than_coarsest_first(
            ladder in arb_ladder(),
            now in 0i64..4_000_000_000_000,
            delay in 0i64..10_000_000,
        ) {
            let due = now + delay;
            let coarsest = |t: i64| {
                (1..ladder.levels())
                    .rev()
                    .map(|level| SliceId { level, window: ladder.window_of(level, due) })
                    .find(|id| ladder.sweep_at(*id) > t + ladder.margin_ms())
                    .map_or(Route::Timer, Route::Slice)
            };
            let walk = |route: &dyn Fn(i64) -> Route| {
                let (mut t, mut hops) = (now, 0);
                while let Route::Slice(id) = route(t) {
                    hops += 1;
                    t = ladder.sweep_at(id);
                }
                (hops, t)
            };
            let (fine_hops, fine_t) = walk(&|t| ladder.route(due, t));
            let (coarse_hops, coarse_t) = walk(&coarsest);
            prop_assert!(fine_hops <= coarse_hops, "{} > {}", fine_hops, coarse_hops);
            prop_assert!(fine_t <= due.max(now) && coarse_t <= due.max(now));
        }
    }
}
