//! Where a pull request's CI run builds when dbt Cloud is overflow capacity: on slimci's fleet
//! or as a run of the repository's dbt Cloud CI job. The words a user reads about the choice
//! (the run's `backend_reason`) are written here.

use std::time::Duration;

use serde::Deserialize;

pub use slimci_client::Backend;

/// Which backend a repository's CI runs try first (`[repository.dbt_cloud] routing`); absent,
/// every run builds on the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Trigger the Cloud CI job while dbt Cloud has room; build on the fleet when it has none.
    CloudFirst,
    /// Build on the fleet; a run that waited `fleet_wait_secs` with every fleet slot busy goes to
    /// dbt Cloud, if it has room.
    FleetFirst,
}

/// What dbt Cloud said of its load a moment ago.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudLoad {
    /// The account's runs queued, starting or running, every page counted.
    pub in_flight: u32,
    /// Of those, the ones still queued.
    pub queued: u32,
    /// How long the oldest queued one has waited (none queued: none).
    pub oldest_queued: Option<Duration>,
    /// The account's run slots, on plans that report them.
    pub run_slots: Option<u32>,
}

/// What the router knows when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub routing: Routing,
    /// The fleet's slots of agents that take work (not draining, not offline), and how many of
    /// them are busy or promised to runs already on the jobs queue.
    pub fleet_slots: u32,
    pub fleet_taken: u32,
    /// How long the run has waited since it was recorded.
    pub waited: Duration,
    /// `fleet_first`: waiting this long with the fleet full sends a run to dbt Cloud.
    pub fleet_wait: Duration,
    /// dbt Cloud's load, or why it could not be read; none when nobody asked (`fleet_first`
    /// with room on the fleet).
    pub cloud: Option<Result<CloudLoad, String>>,
    /// The configured limit on the account's runs in flight.
    pub max_in_flight: Option<u32>,
    /// A queued run older than this in dbt Cloud means dbt Cloud is full.
    pub max_cloud_queue: Duration,
}

/// The router's answer for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Build there; the reason is recorded on the run.
    To(Backend, String),
    /// `fleet_first` with the fleet full: keep waiting for a fleet slot, then look again.
    Wait,
    /// `fleet_first` with the fleet full long enough: ask dbt Cloud's load, then decide again.
    AskCloud,
}

/// Whether dbt Cloud has room, and the sentence that says so.
pub fn cloud_room(
    load: &CloudLoad,
    max_in_flight: Option<u32>,
    max_queue: Duration,
) -> (bool, String) {
    let limit = match (load.run_slots.filter(|slots| *slots > 0), max_in_flight) {
        (Some(slots), Some(cap)) => Some((slots.min(cap), slots <= cap)),
        (Some(slots), None) => Some((slots, true)),
        (None, Some(cap)) => Some((cap, false)),
        (None, None) => None,
    };
    let busy = match limit {
        Some((limit, true)) => format!("{} of {limit} run slots busy", load.in_flight),
        Some((limit, false)) => format!("{} of at most {limit} runs in flight", load.in_flight),
        None => format!("{} runs in flight", load.in_flight),
    };
    let queued = match load.oldest_queued {
        Some(oldest) if load.queued > 0 => {
            format!(
                ", {} queued (the oldest for {})",
                load.queued,
                seconds(oldest)
            )
        }
        _ => String::new(),
    };
    let full_by_count = limit.is_some_and(|(limit, _)| load.in_flight >= limit);
    let full_by_wait = load
        .oldest_queued
        .is_some_and(|oldest| load.queued > 0 && oldest > max_queue);
    let room = !(full_by_count || full_by_wait);
    let why = if full_by_wait && !full_by_count {
        format!(
            "; a run queued longer than {} means full",
            seconds(max_queue)
        )
    } else {
        String::new()
    };
    (room, format!("dbt Cloud: {busy}{queued}{why}"))
}

/// Where the run builds, or what the router must learn first.
pub fn route(view: &RouteView) -> Route {
    let cloud = |view: &RouteView| {
        view.cloud.as_ref().map(|load| match load {
            Ok(load) => cloud_room(load, view.max_in_flight, view.max_cloud_queue),
            Err(error) => (false, format!("dbt Cloud did not answer ({error})")),
        })
    };
    let fleet = format!(
        "fleet: {} of {} slots taken",
        view.fleet_taken.min(view.fleet_slots),
        view.fleet_slots
    );
    match view.routing {
        Routing::CloudFirst => match cloud(view) {
            None => Route::AskCloud,
            Some((true, said)) => Route::To(Backend::DbtCloud, format!("cloud_first; {said}")),
            Some((false, said)) => Route::To(
                Backend::Fleet,
                format!("cloud_first, but dbt Cloud has no room; {said}"),
            ),
        },
        Routing::FleetFirst => {
            if view.fleet_taken < view.fleet_slots {
                return Route::To(Backend::Fleet, format!("fleet_first; {fleet}"));
            }
            if view.waited < view.fleet_wait {
                return Route::Wait;
            }
            match cloud(view) {
                None => Route::AskCloud,
                Some((true, said)) => Route::To(
                    Backend::DbtCloud,
                    format!(
                        "fleet_first, but the fleet was full for {}; {fleet}; {said}",
                        seconds(view.fleet_wait)
                    ),
                ),
                Some((false, said)) => Route::To(
                    Backend::Fleet,
                    format!(
                        "fleet_first; the fleet is full and so is dbt Cloud, so it waits for the fleet; {fleet}; {said}"
                    ),
                ),
            }
        }
    }
}

fn seconds(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 120 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: u32, queued: u32, oldest_secs: u64, run_slots: Option<u32>) -> CloudLoad {
        CloudLoad {
            in_flight,
            queued,
            oldest_queued: (queued > 0).then(|| Duration::from_secs(oldest_secs)),
            run_slots,
        }
    }

    fn view(routing: Routing, taken: u32, waited: u64, cloud: Option<CloudLoad>) -> RouteView {
        RouteView {
            routing,
            fleet_slots: 4,
            fleet_taken: taken,
            waited: Duration::from_secs(waited),
            fleet_wait: Duration::from_secs(60),
            cloud: cloud.map(Ok),
            max_in_flight: None,
            max_cloud_queue: Duration::from_secs(120),
        }
    }

    #[test]
    fn cloud_first_goes_to_cloud_while_it_has_room_and_says_how_full_it_is() {
        let room = view(Routing::CloudFirst, 4, 0, Some(load(3, 0, 0, Some(4))));
        assert_eq!(
            route(&room),
            Route::To(
                Backend::DbtCloud,
                "cloud_first; dbt Cloud: 3 of 4 run slots busy".to_owned()
            )
        );
        let full = view(Routing::CloudFirst, 0, 0, Some(load(6, 2, 30, Some(4))));
        assert_eq!(
            route(&full),
            Route::To(
                Backend::Fleet,
                "cloud_first, but dbt Cloud has no room; dbt Cloud: 6 of 4 run slots busy, 2 queued (the oldest for 30s)".to_owned()
            )
        );
        // Nothing asked yet: ask first.
        assert_eq!(
            route(&view(Routing::CloudFirst, 0, 0, None)),
            Route::AskCloud
        );
        // dbt Cloud not answering is no room.
        let mut silent = view(Routing::CloudFirst, 0, 0, None);
        silent.cloud = Some(Err("503 Service Unavailable".to_owned()));
        assert_eq!(
            route(&silent),
            Route::To(
                Backend::Fleet,
                "cloud_first, but dbt Cloud has no room; dbt Cloud did not answer (503 Service Unavailable)".to_owned()
            )
        );
    }

    #[test]
    fn without_run_slots_the_cap_and_the_queue_time_say_when_cloud_is_full() {
        // CI runs take no run slot on current plans: the account reports none.
        let (room, said) = cloud_room(&load(5, 0, 0, None), Some(6), Duration::from_secs(120));
        assert!(room, "{said}");
        assert_eq!(said, "dbt Cloud: 5 of at most 6 runs in flight");
        let (room, said) = cloud_room(&load(6, 0, 0, None), Some(6), Duration::from_secs(120));
        assert!(!room, "{said}");
        // The smaller of run slots and the cap.
        let (room, said) = cloud_room(&load(3, 0, 0, Some(8)), Some(3), Duration::from_secs(120));
        assert!(!room, "{said}");
        assert_eq!(said, "dbt Cloud: 3 of at most 3 runs in flight");
        // No limit at all: only the queue time.
        let (room, said) = cloud_room(&load(40, 1, 30, None), None, Duration::from_secs(120));
        assert!(room, "{said}");
        let (room, said) = cloud_room(&load(40, 1, 600, None), None, Duration::from_secs(120));
        assert!(!room, "{said}");
        assert_eq!(
            said,
            "dbt Cloud: 40 runs in flight, 1 queued (the oldest for 10m00s); a run queued longer than 2m00s means full"
        );
    }

    #[test]
    fn fleet_first_waits_for_the_fleet_then_overflows_to_cloud_if_it_has_room() {
        assert_eq!(
            route(&view(Routing::FleetFirst, 3, 0, None)),
            Route::To(
                Backend::Fleet,
                "fleet_first; fleet: 3 of 4 slots taken".to_owned()
            )
        );
        assert_eq!(route(&view(Routing::FleetFirst, 4, 59, None)), Route::Wait);
        assert_eq!(
            route(&view(Routing::FleetFirst, 5, 61, None)),
            Route::AskCloud
        );
        assert_eq!(
            route(&view(Routing::FleetFirst, 5, 61, Some(load(1, 0, 0, Some(4))))),
            Route::To(
                Backend::DbtCloud,
                "fleet_first, but the fleet was full for 60s; fleet: 4 of 4 slots taken; dbt Cloud: 1 of 4 run slots busy".to_owned()
            )
        );
        let Route::To(Backend::Fleet, said) = route(&view(
            Routing::FleetFirst,
            4,
            61,
            Some(load(4, 0, 0, Some(4))),
        )) else {
            panic!("a full Cloud keeps the run on the fleet");
        };
        assert!(said.contains("so is dbt Cloud"), "{said}");
    }
}
