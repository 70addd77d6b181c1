//! The generated code names everything by absolute path: it compiles without the prelude and
//! next to user types that shadow std names.

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Opened {
    pub(crate) owner: ::std::string::String,
}

#[derive(Default)]
pub(crate) struct State(pub(crate) u32);

impl es_core::Apply<Opened> for State {
    fn apply(&mut self, _: &Opened) {
        self.0 += 1;
    }
}

#[no_implicit_prelude]
mod no_prelude {
    #[derive(Debug, PartialEq, ::es_core::DomainEvent)]
    #[event(apply(super::State))]
    pub(crate) enum Event {
        #[event(rename = "opened", version = 2)]
        Opened(super::Opened),
    }
}

#[allow(dead_code, non_camel_case_types)]
mod shadowing {
    // Types and a module named like the std items the generated code uses.
    pub(crate) struct Result;
    pub(crate) struct Vec;
    pub(crate) struct Option;
    pub(crate) struct From;
    pub(crate) struct u32;
    pub(crate) struct str;
    pub(crate) struct u8;
    pub(crate) mod std {}
    pub(crate) mod serde_json {}
    pub(crate) trait DomainEvent {}
    pub(crate) trait Apply {}

    #[derive(Debug, PartialEq, es_core::DomainEvent)]
    #[event(apply(super::State))]
    pub(crate) enum Event {
        Opened(super::Opened),
    }
}

#[test]
fn works_without_the_prelude() {
    use es_core::DomainEvent;

    let event = no_prelude::Event::from(Opened {
        owner: "ann".to_owned(),
    });
    assert_eq!(event.event_type(), "opened");
    assert_eq!(event.schema_version(), 2);
    let back = no_prelude::Event::from_payload("opened", &event.to_payload().unwrap()).unwrap();
    assert_eq!(back, event);
    let mut state = State::default();
    event.apply_to(&mut state);
    assert_eq!(state.0, 1);
}

#[test]
fn works_next_to_shadowing_names() {
    use es_core::DomainEvent;

    let event = shadowing::Event::from(Opened {
        owner: "bob".to_owned(),
    });
    assert_eq!(event.event_type(), "Opened");
    let mut state = State::default();
    event.apply_to(&mut state);
    assert_eq!(state.0, 1);
}
