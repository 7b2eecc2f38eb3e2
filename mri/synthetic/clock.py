"""The disease clock: diagnosis from years since MCI onset, and the compounding log volume change of each
structure (rates and references in the package docstring)."""
import math



DX = ("CN", "MCI", "Dementia")

T_MCI = 4.0  # years from MCI onset to dementia
T_PRE = 6.0  # years of faster (MCI-rate) atrophy before MCI onset
REF_AGE = 50.0  # anatomy is defined at this age; aging runs from here
ANNUAL_CHANGE = {  # fractional volume change per year, compounding
    "hippocampus": {"CN": -0.014, "MCI": -0.030, "Dementia": -0.047},
    "brain": {"CN": -0.0045, "MCI": -0.007, "Dementia": -0.010},
    "ventricles": {"CN": 1.2 ** 0.1 - 1.0, "MCI": 0.035, "Dementia": 0.05},
}

# ---------------------------------------------------------------- disease clock and atrophy

def stage(tau):
    """'CN', 'MCI' or 'Dementia' from the disease clock."""
    return "CN" if not tau >= 0 else ("MCI" if tau < T_MCI else "Dementia")


def _stage_years(tau):
    """Years at the MCI rate (preclinical + MCI) and in Dementia by clock value tau."""
    if not tau >= -T_PRE:
        return 0.0, 0.0
    return min(tau + T_PRE, T_PRE + T_MCI), max(tau - T_MCI, 0.0)


def log_change(structure, age, tau):
    """log(volume / volume at age 50 without disease) of 'hippocampus', 'brain' or 'ventricles'."""
    r = {dx: math.log1p(p) for dx, p in ANNUAL_CHANGE[structure].items()}
    t_fast, t_ad = _stage_years(tau)
    return r["CN"] * max(age - REF_AGE, 0.0) + (r["MCI"] - r["CN"]) * t_fast + (r["Dementia"] - r["CN"]) * t_ad


def disease_clock(tau, age, target_age, target_dx):
    """Clock of the same subject seen at `target_age` with diagnosis `target_dx`.

    The clock runs on with age, then is moved into the target stage if it is not there already:
    MCI -> [0.5, T_MCI - 0.5], Dementia -> >= T_MCI + 0.5; CN -> -inf (no disease) for a subject whose own
    clock is MCI or Dementia, while a CN subject on its way to MCI (finite tau < 0) stays CN by stopping its
    clock 0.5 years before MCI onset (or at its own clock if that is later), so it keeps the preclinical
    atrophy it already has and its CN aging stays monotone. A subject's own (age, dx) returns its own tau.
    """
    t = tau + (target_age - age)
    if target_dx == "CN" and -math.inf < tau < 0:
        return min(t, max(tau, -0.5))
    if stage(t) == target_dx:
        return t
    if target_dx == "CN":
        return -math.inf
    if target_dx == "MCI":
        return min(max(t, 0.5), T_MCI - 0.5)
    if target_dx == "Dementia":
        return T_MCI + 0.5
    raise ValueError(f"unknown diagnosis {target_dx!r}; expected one of {DX}")


def tau_of(row):
    """Disease clock of a cohort row at its visit age (AGE + Years_bl)."""
    return float(row["AGE"]) + float(row["Years_bl"]) - float(row["onset_age"])


