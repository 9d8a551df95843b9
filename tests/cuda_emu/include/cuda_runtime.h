// Stub for the CUDA emulator of the tests (../emu.h).
#pragma once
#include "../emu.h"
